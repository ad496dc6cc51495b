"""The hospital operator's commands: ``tba-fed site init DIR`` (the key pair made at the site, the state, a filled
site.yaml; nothing replaced), ``tba-fed connect RUN.yaml`` (the Flower connection, as submit adds it) and
``tba-fed status`` on a SuperLink that is not running and at a site (ε from its own ledger). The three-hospital
deployment built from such kits is tests/test_site_kit_deployment.py."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import tomli
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tba_fed.cli import main
from tba_fed.deploy import checks as c
from tba_fed.deploy.processes import free_port
from tba_fed.federation.config import load_site_config
from tba_fed.federation.flower_internals import public_key_to_bytes
from tba_fed.privacy.accounting import epsilon_spent, noise_multiplier
from tba_fed.privacy.ledger import LedgerEntry, PrivacyLedger, now
from tba_fed.privacy.site_state import open_state

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
MODEL_FLAGS = ["--model", "vit_tiny_patch16_224", *[f"--model-arg={k}={v}" for k, v in TINY.items()]]


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """The coordinator's CA and SuperLink certificate; no site key (each site makes its own)."""
    folder = tmp_path_factory.mktemp("kit") / "certs"
    subprocess.run(["bash", str(REPO / "scripts/make-certificates.sh"), str(folder), "127.0.0.1"], check=True,
                   capture_output=True)
    return folder


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    return tmp_path / "flwr-home"


def init_flags(certs: Path, name: str = "hospital-a", port: int = 9092, *extra: str) -> list[str]:
    return ["--name", name, "--superlink", f"127.0.0.1:{port}", "--ca", str(certs / "ca.crt"), "--data", "images",
            *MODEL_FLAGS, "--epsilon", "4", *extra]


def test_site_init_makes_the_key_pair_at_the_site_and_prints_the_one_file_to_send(tmp_path, certs, capsys,
                                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    kit = tmp_path / "hospital-a"
    assert main(["site", "init", str(kit), *init_flags(certs), "--min-noise-sites", "2", "--min-images", "20"]) == 0
    out = capsys.readouterr().out.splitlines()
    private, public = kit / "keys" / "hospital-a.key", kit / "keys" / "hospital-a.key.pub"
    assert out[-2:] == [f"Send the coordinator this one file: {public}",
                        f"Once the coordinator has registered it, run: tba-fed supernode {kit / 'site.yaml'}"]
    # the private key: OpenSSH, EC P-384 (what flower-supernode --auth-supernode-private-key loads), 0600 in 0700
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600 and stat.S_IMODE(os.stat(private.parent).st_mode) == 0o700
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    # the public key: the file the coordinator lists under superlink.sites, named by its comment
    text = public.read_text()
    assert text.startswith("ecdsa-sha2-nistp384 ") and text.endswith(" hospital-a\n")
    assert public_key_to_bytes(serialization.load_ssh_public_key(public.read_bytes())) == \
        public_key_to_bytes(key.public_key())
    assert c.public_key_check("superlink.sites.hospital-a", public).status == "OK"
    assert c.auth_key_check("connection.auth_key", private).status == "OK"
    # site.yaml: filled from the flags, pointing at the kit's key, state and ledger
    site = load_site_config(kit / "site.yaml")
    assert site.name == "hospital-a" and site.profile == "production"
    assert site.connection is not None and site.connection.auth_key == private
    assert site.connection.superlink == "127.0.0.1:9092" and site.connection.root_certificates == certs / "ca.crt"
    assert (site.data.source, site.data.path) == ("image_folder", tmp_path / "images")
    assert site.model is not None and site.model.kwargs == TINY
    assert (site.privacy.epsilon, site.privacy.min_noise_sites, site.privacy.min_images) == (4.0, 2, 20)
    assert site.state == kit / "state" and site.privacy.ledger == kit / "privacy-ledger.json"
    state = open_state(site.state, site.name, site.privacy.ledger)  # initialised: split key and empty ledger
    assert len(state.split_key) == 32 and PrivacyLedger(state.ledger).entries() == []


def test_site_init_never_replaces_a_file(tmp_path, certs, capsys):
    kit = tmp_path / "hospital-a"
    assert main(["site", "init", str(kit), *init_flags(certs)]) == 0
    before = {p: p.read_bytes() for p in kit.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["site", "init", str(kit), *init_flags(certs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tba-fed: error: DIR: {kit / 'site.yaml'} already exists (a site YAML): site init never replaces a "
                   "file (keep that kit (tba-fed preflight its site.yaml), or give a new, empty directory)"]
    assert {p: p.read_bytes() for p in kit.rglob("*") if p.is_file()} == before

    # a key someone else put there: refused before anything is written
    other = tmp_path / "hospital-b"
    (other / "keys").mkdir(parents=True)
    (other / "keys" / "hospital-b.key").write_text("their key")
    assert main(["site", "init", str(other), *init_flags(certs, "hospital-b")]) == 2
    assert f"DIR: {other / 'keys' / 'hospital-b.key'} already exists (a private key)" in capsys.readouterr().err
    assert sorted(p.name for p in other.rglob("*")) == ["hospital-b.key", "keys"]
    assert (other / "keys" / "hospital-b.key").read_text() == "their key"


@pytest.mark.parametrize("flags,expected", [
    (["--ca", "missing.crt"], "--ca: cannot read /"),
    (["--superlink", "superlink.example.org"], "connection.superlink:"),
    (["--name", "../a"], "--name: '../a' cannot name a site's files"),
    (["--epsilon", "-1"], "privacy.epsilon:"),
])
def test_site_init_refuses_bad_flags_in_one_line_and_writes_nothing(tmp_path, certs, capsys, flags, expected):
    kit = tmp_path / "kit"
    assert main(["site", "init", str(kit), *init_flags(certs), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tba-fed: error: {expected}"), err
    assert not kit.exists()


def test_the_coordinator_refuses_a_private_key_listed_as_a_site_key(tmp_path, certs):
    assert main(["site", "init", str(tmp_path / "kit"), *init_flags(certs)]) == 0
    check = c.public_key_check("superlink.sites.hospital-a", tmp_path / "kit" / "keys" / "hospital-a.key")
    assert check.problem and "is a private key: a site's private key never leaves the site" in check.message


def _run_yaml(tmp: Path, certs: Path, port: int, sites: dict[str, str] | None = None) -> Path:
    superlink = {"address": "127.0.0.1", "port": port, "database": str(tmp / "superlink.db"),
                 "certificates": {"certfile": str(certs / "server.pem"), "keyfile": str(certs / "server.key"),
                                  "ca_certfile": str(certs / "ca.crt")},
                 "sites": sites or {"hospital-a": str(tmp / "hospital-a.key.pub")}}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "vit_tiny_patch16_224", "kwargs": TINY}, "plan": "1->2",
                                    "output": str(tmp / "server-out"), "superlink": superlink}))
    return path


def test_connect_adds_the_connection_submit_would_and_refuses_a_foreign_one(tmp_path, certs, home, capsys):
    run = _run_yaml(tmp_path, certs, 9300)
    assert main(["connect", str(run), "--print"]) == 0 and not home.exists()  # --print writes nothing
    assert capsys.readouterr().out.startswith(f"# adds to {home / 'config.toml'}:\n[superlink.hospitals]\n")
    assert main(["connect", str(run)]) == 0
    assert capsys.readouterr().out.strip() == (f"{home / 'config.toml'}: [superlink.hospitals] added (127.0.0.1:9300); "
                                               "e.g. flwr supernode list hospitals")
    config = tomli.loads((home / "config.toml").read_text())
    assert config["superlink"]["hospitals"] == {"address": "127.0.0.1:9300",
                                                "root-certificates": str(certs / "ca.crt")}
    assert config["superlink"]["local"] == {"address": ":local:"}  # Flower's default entries kept
    written = (home / "config.toml").read_text()
    assert main(["connect", str(run)]) == 0 and "already there" in capsys.readouterr().out
    assert (home / "config.toml").read_text() == written
    # the same name pointing elsewhere (an operator's edit) is refused, the file untouched
    assert main(["connect", str(_run_yaml(tmp_path, certs, 9301))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tba-fed: error: --connection: the Flower connection [superlink.hospitals] in ")
    assert "address is '127.0.0.1:9300' there, '127.0.0.1:9301' for this run" in err
    assert (home / "config.toml").read_text() == written
    assert main(["connect", str(_run_yaml(tmp_path, certs, 9301)), "--connection", "second"]) == 0
    assert tomli.loads((home / "config.toml").read_text())["superlink"]["second"]["address"] == "127.0.0.1:9301"


def test_status_of_a_stopped_superlink_is_a_problem_and_exits_1(tmp_path, certs, capsys):
    port = free_port()  # nothing listens there
    assert main(["site", "init", str(tmp_path / "kit"), *init_flags(certs)]) == 0
    capsys.readouterr()
    run = _run_yaml(tmp_path, certs, port, {"hospital-a": str(tmp_path / "kit" / "keys" / "hospital-a.key.pub")})
    assert main(["status", str(run)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"PROBLEM superlink: the SuperLink at 127.0.0.1:{port} does not answer (Connection refused) "
                        "(fix: start it (systemctl start tba-fed-superlink, or tba-fed superlink RUN.yaml); check the "
                        "address and the firewall)")
    assert lines[-2] == f"NOTE    audit: {tmp_path / 'server-out.audit.jsonl'} does not exist yet: no request served"
    assert lines[-1] == f"status {run}: 1 problem(s)"


def test_status_at_a_site_reports_epsilon_spent_and_left_from_its_own_ledger(tmp_path, certs, capsys):
    kit = tmp_path / "kit"
    assert main(["site", "init", str(kit), *init_flags(certs, port=free_port())]) == 0
    sigma = noise_multiplier(1.0, 1e-5, 1)
    PrivacyLedger(kit / "privacy-ledger.json").record(
        LedgerEntry(run_id="run-3", release="statistics", spec_sha256="ab" * 32, mechanism="gaussian",
                    noise_multiplier=sigma, noise_std={}, noise="secure", aggregation="local", images=300,
                    epsilon_run=1.0, delta=1e-5, time=now()), budget=4.0, delta=1e-5)
    capsys.readouterr()
    assert main(["status", str(kit / "site.yaml")]) == 1  # its SuperLink is not running
    lines = capsys.readouterr().out.splitlines()
    spent = epsilon_spent([(sigma, 1)], 1e-5)
    assert 0.5 < spent <= 1.0
    assert f"OK      privacy: releases statistics; ε {spent:.4f} spent of 4, {4 - spent:.4f} left at δ=1e-05 (RDP, " \
           "add/remove-one-image); min_images 100" in lines
    assert lines[0].startswith("PROBLEM connection.superlink: the SuperLink at 127.0.0.1:")
    # the site's budget spent: a problem too
    PrivacyLedger(kit / "privacy-ledger.json").record(
        LedgerEntry(run_id="run-4", release="statistics", spec_sha256="cd" * 32, mechanism="gaussian",
                    noise_multiplier=noise_multiplier(4.0, 1e-5, 1), noise_std={}, noise="secure",
                    aggregation="local", images=300, epsilon_run=4.0, delta=1e-5, time=now()), budget=100.0, delta=1e-5)
    assert main(["status", str(kit / "site.yaml")]) == 1
    assert any(line.startswith("PROBLEM privacy.epsilon: the budget is spent") for line in
               capsys.readouterr().out.splitlines())


def _yaml_block(markdown: str, heading: str) -> dict:
    """The first ```yaml block after `heading` in a document."""
    section = markdown[markdown.index(heading):]
    return yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])


def test_the_deployment_templates_and_docs_survive_one_dropout_and_every_site_accepts_the_run():
    """docs/deployment.md section 4 once asked for min_sites 2 with secure aggregation while every site refused a
    split over fewer than its min_noise_sites (3), and the templates needed 3 of 3 sites, so one dropout ended the
    run, contrary to the runbook's failure table."""
    from tba_fed.config import validate
    from tba_fed.federation.config import FederatedRunConfig, SiteConfig

    folder = REPO / "configs" / "deployment"
    run = validate(FederatedRunConfig, yaml.safe_load((folder / "run.yaml").read_text()))
    sites = [load_site_config(path) for path in sorted(folder.glob("site-*.yaml"))]
    docs = (REPO / "docs" / "deployment.md").read_text()
    documented_run = _yaml_block(docs, "## 4. The run")
    documented_site = validate(SiteConfig, _yaml_block(docs, "## 3. Each site"))
    assert documented_run["federation"] == run.federation.model_dump(include=set(documented_run["federation"]))
    assert documented_run["privacy"]["aggregation"] == run.privacy.aggregation
    assert run.superlink is not None and sorted(run.superlink.sites) == [s.name for s in sites]
    fed = run.federation
    assert fed.num_sites == len(sites) and fed.min_sites == fed.num_sites - 1  # one dropout survives
    assert run.privacy is not None and run.privacy.aggregation == "secure"
    for site in [*sites, documented_site]:
        policy = site.privacy  # what the site checks of a secure round: noise split over m = min_sites
        assert policy.min_noise_sites <= fed.min_sites <= policy.max_noise_sites, site.name
        assert policy.secure_aggregation != "refused" and "statistics" in policy.releases
        assert run.privacy.epsilon <= policy.epsilon and run.privacy.delta <= policy.delta
        assert site.model == run.model and site.profile == run.profile == "production"
        assert site.connection is not None and site.connection.auth_key is not None
        assert site.connection.auth_key.parent.name == "keys"  # the kit's layout: made at the site
