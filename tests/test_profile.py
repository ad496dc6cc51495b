"""The production and development profiles: what each refuses to start without, the simulation's
profile, a production site refusing a development run, and the production ServerApp's check of a
real SuperLink started without SuperNode authentication."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tba_fed import ModelConfig, TBAInputError, create_model
from tba_fed.privacy.site_state import initialise
from tba_fed.federation.config import load_federated_config, load_site_config
from tba_fed.deploy.flower_control import registered_nodes
from tba_fed.deploy.launch import superlink_command, supernode_command
from tba_fed.deploy.profile import development_run, verify_superlink
from tba_fed.deploy.processes import executable, free_port, local_superlink
from tba_fed.deploy.simulate import simulate
from tba_fed.federation.site import install, resolve_site
from tba_fed.federation.site_context import SiteContext
from tba_fed.plan import parse_plan
from tba_fed.solver import LinearMap

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
MODEL = {"name": "vit_tiny_patch16_224", "kwargs": TINY}
DEVELOPMENT = "or set profile: development for a simulation or a local test"


def _superlink(tmp: Path, **changes) -> dict:
    section = {"address": "127.0.0.1", "port": 9092,
               "certificates": {"certfile": str(tmp / "server.pem"), "keyfile": str(tmp / "server.key"),
                                "ca_certfile": str(tmp / "ca.crt")},
               "database": str(tmp / "superlink.db"), "sites": {"hospital-a": str(tmp / "hospital-a.key.pub")}}
    return {k: v for k, v in {**section, **changes}.items() if v is not None}


def _run(tmp: Path, profile: str | None = None, **superlink) -> Path:
    path = tmp / "run.yaml"
    config = {"model": MODEL, "plan": "1->2", "superlink": _superlink(tmp, **superlink)}
    path.write_text(yaml.safe_dump(config if profile is None else {**config, "profile": profile}))
    return path


def _site(tmp: Path, profile: str | None = None, **connection) -> Path:
    path = tmp / "site.yaml"
    conn = {"superlink": "superlink.example.org:9092", "root_certificates": str(tmp / "ca.crt"),
            "auth_key": str(tmp / "hospital-a.key"), **connection}
    config = {"name": "hospital-a", "data": {"source": "synthetic", "num_images": 8}, "output": str(tmp / "out"),
              "privacy": {"require_dp": False, "min_images": 1, "ledger": str(tmp / "ledger.json")},
              "state": str(tmp / "state"), "connection": {k: v for k, v in conn.items() if v is not None}}
    path.write_text(yaml.safe_dump(config if profile is None else {**config, "profile": profile}))
    return path


def test_production_superlink_command(tmp_path):
    args = superlink_command(load_federated_config(_run(tmp_path)))
    assert args == [executable("flower-superlink"), "--host", "0.0.0.0", "--port", "9092",
                    "--disable-runtime-dependency-installation", "--ssl-certfile", str(tmp_path / "server.pem"),
                    "--ssl-keyfile", str(tmp_path / "server.key"), "--ssl-ca-certfile", str(tmp_path / "ca.crt"),
                    "--enable-supernode-auth", "--database", str(tmp_path / "superlink.db")]


@pytest.mark.parametrize("missing,expected", [
    ({"certificates": None},
     "superlink.certificates: the production profile needs TLS (set certfile, keyfile and ca_certfile "
     f"(scripts/make-certificates.sh writes them), {DEVELOPMENT})"),
    ({"node_auth": False},
     "superlink.node_auth: the production profile needs SuperNode authentication (--enable-supernode-auth) (set "
     f"node_auth: true and list each site's public key under superlink.sites, {DEVELOPMENT})"),
    ({"database": None},
     "superlink.database: the production profile needs a persistent SuperLink state (in memory, registrations and "
     f"runs vanish on restart) (set database: /srv/tba-fed/superlink.db, {DEVELOPMENT})"),
])
def test_production_superlink_refuses_to_start_without_each_requirement(tmp_path, missing, expected):
    path = _run(tmp_path, **missing)
    with pytest.raises(TBAInputError) as err:
        superlink_command(load_federated_config(path))
    assert str(err.value) == expected
    if "database" in missing:  # the command a coordinator types: exit 2, the same message, nothing started
        done = subprocess.run([executable("python"), "-m", "tba_fed.cli", "superlink", str(path)], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.strip().endswith(f"tba-fed: error: {expected}")


def test_insecure_only_in_development(tmp_path):
    dev = superlink_command(load_federated_config(_run(tmp_path, "development", certificates=None, node_auth=False,
                                                       database=None)))
    assert dev[-2:] == ["--disable-runtime-dependency-installation", "--insecure"]
    with pytest.raises(TBAInputError, match=r"^superlink.node_auth: SuperNode authentication needs TLS \("):
        superlink_command(load_federated_config(_run(tmp_path, "development", certificates=None)))
    site = _site(tmp_path)
    assert supernode_command(load_site_config(site), site) == [
        executable("flower-supernode"), "--superlink", "superlink.example.org:9092",
        "--root-certificates", str(tmp_path / "ca.crt"), "--auth-supernode-private-key", str(tmp_path / "hospital-a.key"),
        "--node-config", f'site-config="{site}"']
    for field, expected in (
            ("root_certificates", "the production profile needs TLS: the CA certificate that signed the SuperLink's "
                                  f"certificate (set root_certificates: /path/ca.crt, {DEVELOPMENT})"),
            ("auth_key", "the production profile needs this site's registered authentication key (set auth_key: "
                         f"/path/hospital-a.key (its .pub registered at the SuperLink), {DEVELOPMENT})")):
        site = _site(tmp_path, **{field: None})
        with pytest.raises(TBAInputError) as err:
            supernode_command(load_site_config(site), site)
        assert str(err.value) == f"connection.{field}: {expected}"
    site = _site(tmp_path, "development", root_certificates=None, auth_key=None)
    assert supernode_command(load_site_config(site), site)[2:5] == ["superlink.example.org:9092", "--insecure",
                                                                     "--node-config"]


def test_seeded_noise_only_in_development(tmp_path):
    path = _run(tmp_path)
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, "privacy": {"epsilon": 1.0, "seed": 3}}))
    with pytest.raises(TBAInputError) as err:
        superlink_command(load_federated_config(path))
    assert str(err.value) == ("privacy.seed: seeded noise is predictable: the production profile draws it from the "
                              f"CSPRNG (remove privacy.seed, {DEVELOPMENT})")
    path.write_text(yaml.safe_dump({**config, "privacy": {"epsilon": 1.0, "seed": 3}, "profile": "development"}))
    assert "--enable-supernode-auth" in superlink_command(load_federated_config(path))
    site = _site(tmp_path)
    config = yaml.safe_load(site.read_text())
    site.write_text(yaml.safe_dump({**config, "privacy": {**config["privacy"], "allow_seeded_noise": True}}))
    with pytest.raises(TBAInputError) as err:
        supernode_command(load_site_config(site), site)
    assert str(err.value) == ("privacy.allow_seeded_noise: seeded noise is predictable: the production profile refuses "
                              f"it (set allow_seeded_noise: false, {DEVELOPMENT})")


def test_simulate_is_development_and_refuses_explicit_production(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "plan": "1->2", "output": str(tmp_path / "out")}))
    config = load_federated_config(path)
    assert config.profile == "production"  # safe by default...
    assert development_run(config).model_dump(mode="json")["profile"] == "development"  # ...what simulate hands Flower
    path.write_text(yaml.safe_dump({"model": MODEL, "plan": "1->2", "output": str(tmp_path / "out"),
                                    "profile": "production"}))
    with pytest.raises(TBAInputError) as err:
        simulate(path)
    assert str(err.value).startswith("profile: tba-fed simulate runs Flower's simulation engine (no TLS, no SuperNode "
                                     "authentication, state in memory): it is the development profile, and this config "
                                     "says production (remove profile (or set profile: development) to simulate")
    assert not (tmp_path / "out").exists()  # refused before anything started


def test_production_site_refuses_a_development_run_and_reports_its_profile(tmp_path):
    model = create_model(ModelConfig.model_validate(MODEL))
    node = {"site-config": str(_site(tmp_path))}
    initialise(tmp_path / "state", "hospital-a", tmp_path / "ledger.json")  # tba-fed site init
    for requested in ({"profile": "development"}, {}):
        with pytest.raises(TBAInputError) as err:
            resolve_site(SiteContext(node, {}), model, requested)
        assert str(err.value) == (f"profile: hospital-a runs in the production profile and refuses a run whose profile "
                                  f"is {requested.get('profile')!r} (run it with profile: production in the run YAML)")
    site = resolve_site(SiteContext(node, {}), model, {"profile": "production"})
    assert site.profile == "production" and len(site.calibration.dataset) + len(site.holdout.dataset) == 8
    maps = {span: LinearMap(torch.eye(48, dtype=torch.float64), None) for span in parse_plan("1->2", 6).spans}
    install(model, site, maps, {"model": MODEL, "plan": "1->2", "profile": "production"})
    report = json.loads((tmp_path / "out" / "compressed" / "report.json").read_text())
    assert report["profile"] == "production" and report["site"] == {"name": "hospital-a", "profile": "production"}
    with pytest.raises(TBAInputError, match="^profile: site-0 runs in the development profile and refuses a run whose "
                                            "profile is 'production'"):  # simulated sites are development
        resolve_site(SiteContext({"partition-id": 0, "num-partitions": 2}, {"config-path": "unused"}), model,
                     {"profile": "production"})


@pytest.mark.slow  # a real flower-superlink
def test_production_server_refuses_a_superlink_without_node_auth(tmp_path):
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(REPO / "scripts/make-certificates.sh"), str(certs), "127.0.0.1", "hospital-a"],
                   check=True, capture_output=True)
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    config = load_federated_config(_run(certs, port=port, database=str(home / "superlink.db")))
    with local_superlink(home, port, certificates=certs, node_auth=False):  # TLS and a database, but no node auth
        with pytest.raises(TBAInputError) as err:
            verify_superlink(config)
        assert registered_nodes(f"127.0.0.1:{port}", certs / "ca.crt") == []  # the probe's key was unregistered
    assert str(err.value) == (f"superlink.node_auth: production run refused: the SuperLink at 127.0.0.1:{port} lets "
                              "unregistered SuperNodes register (started without --enable-supernode-auth) (start the "
                              "SuperLink with tba-fed superlink RUN.yaml)")
