"""A real deployment on loopback in the production profile: `tba-fed superlink` (flower-superlink with TLS,
SuperNode authentication and a database; it registers the sites' keys), three `tba-fed supernode` processes
each reading its own site YAML, and `flwr run`, the sequence docs/deployment.md gives to hospitals. Every
process started here is stopped by pid, pass or fail."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tba_fed import ModelConfig, ViTAdapter, load_compressed, solve_plan
from tba_fed.calibrate import collect_span_stats
from tba_fed.config import DataConfig
from tba_fed.data import build_dataset, calibration_split, make_loader
from tba_fed.federation.flower_control import registered_nodes
from tba_fed.federation.simulate import app_directory, flower_env, free_port, stop_process
from tba_fed.models import create_model
from tba_fed.plan import parse_plan
from tba_fed.privacy.ledger import PrivacyLedger
from tba_fed.privacy.policy import RELEASES

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITES = ("hospital-a", "hospital-b", "hospital-c")
MODEL = {"name": "vit_tiny_patch16_224", "kwargs": TINY}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    home = tmp / "flwr-home"
    home.mkdir()
    certs = tmp / "certs"
    subprocess.run(["bash", str(REPO / "scripts/make-certificates.sh"), str(certs), "127.0.0.1", *SITES],
                   check=True, capture_output=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "hospitals"\n\n[superlink.hospitals]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n')
    env = flower_env(home)
    # the production profile: TLS, registered site keys, persistent state (tba-fed superlink registers the keys)
    superlink = {"address": "127.0.0.1", "host": "127.0.0.1", "port": port,
                 "certificates": {"certfile": str(certs / "server.pem"), "keyfile": str(certs / "server.key"),
                                  "ca_certfile": str(certs / "ca.crt")},
                 "database": str(tmp / "superlink.db"), "sites": {name: str(certs / f"{name}.key.pub") for name in SITES}}
    nodes = {}
    with contextlib.ExitStack() as stack:
        _tba_fed(stack, env, tmp / "superlink.log", "superlink",
                 _write(tmp / "superlink.yaml", {"model": MODEL, "superlink": superlink}))
        _wait_for_keys(port, certs, tmp / "superlink.log")
        for seed, name in enumerate(SITES, start=1):
            data = {"source": "synthetic", "num_images": 24, "seed": seed, "batch_size": 8, "holdout_fraction": 0.25}
            policy = {"require_dp": False, "epsilon": 20.0, "min_images": 5, "releases": list(RELEASES),
                      "ledger": str(tmp / name / "privacy-ledger.json")}
            connection = {"superlink": f"127.0.0.1:{port}", "root_certificates": str(certs / "ca.crt"),
                          "auth_key": str(certs / f"{name}.key"), "port": free_port()}
            site_yaml = _write(tmp / f"{name}.yaml", {"name": name, "data": data, "output": str(tmp / name),
                                                      "privacy": policy, "connection": connection})
            process = _tba_fed(stack, env, tmp / f"{name}.log", "supernode", site_yaml)
            nodes[name] = {"process": process, "log": tmp / f"{name}.log", "yaml": site_yaml}
        yield {"tmp": tmp, "env": env, "nodes": nodes, "superlink": superlink}


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _tba_fed(stack: contextlib.ExitStack, env: dict, log: Path, command: str, config: Path) -> subprocess.Popen:
    """`tba-fed superlink|supernode CONFIG` as an operator starts it, stopped (by pid) when the cluster ends."""
    handle = stack.enter_context(open(log, "w"))  # noqa: SIM115 - closed by the stack
    process = subprocess.Popen([sys.executable, "-m", "tba_fed.cli", command, str(config)], env=env, stdout=handle,
                               stderr=subprocess.STDOUT)
    stack.callback(stop_process, process)
    return process


def _wait_for_keys(port: int, certs: Path, log: Path, timeout: float = 120.0) -> None:
    """Until the SuperLink serves TLS and every site's key is registered (tba-fed superlink does both)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # not serving yet
            if len(registered_nodes(f"127.0.0.1:{port}", certs / "ca.crt")) == len(SITES):
                return
        time.sleep(0.5)
    pytest.fail(f"the sites' keys were not registered within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _run(cluster, name: str, config: dict) -> subprocess.Popen:
    run = cluster["tmp"] / f"{name}.yaml"
    base = {"model": MODEL, "output": str(cluster["tmp"] / name), "superlink": cluster["superlink"]}
    run.write_text(yaml.safe_dump({**base, **config}))
    return subprocess.Popen([str(BIN / "flwr"), "run", str(app_directory()), "hospitals", "--stream",
                             "--run-config", f'config-path="{run}"'], env=cluster["env"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _centralised(cluster, sites, plan):
    model = create_model(ModelConfig.model_validate(MODEL))
    batches = []
    for name in sites:
        data = DataConfig.model_validate(yaml.safe_load(cluster["nodes"][name]["yaml"].read_text())["data"])
        calibration, _ = calibration_split(build_dataset(data, model), data)
        batches += list(make_loader(calibration, data))
    return solve_plan(collect_span_stats(ViTAdapter(model), batches, plan.spans), bias=True), batches


def _assert_maps_equal(folder: Path, central) -> None:
    maps = load_file(str(folder / "maps.safetensors"))
    for span, fit in central.items():
        for name, expected in (("weight", fit.map.weight), ("bias", fit.map.bias)):
            got = maps[f"span.{span.key}.{name}"]
            assert float((got - expected).norm() / expected.norm()) < 1e-9


def test_three_hospitals_with_tls_and_node_auth(cluster):
    run = _run(cluster, "all-sites", {"plan": "1->2, 3->5",
                                      "federation": {"num_sites": 3, "min_sites": 3, "round_timeout": 300}})
    out, _ = run.communicate(timeout=600)
    folder = cluster["tmp"] / "all-sites"
    assert (folder / "report.json").is_file(), out[-3000:]
    report = json.loads((folder / "report.json").read_text())
    for rnd in report["federation"]["rounds"]:
        assert sorted(rnd["sites"]) == list(SITES) and {v["status"] for v in rnd["sites"].values()} == {"ok"}
    # the production ServerApp checked the running SuperLink itself before round 1, and says so
    assert report["profile"] == "production"
    assert [line.split()[:2] for line in report["superlink_checks"]] == [
        ["OK", "superlink.certificates:"], ["OK", "superlink.node_auth:"], ["OK", "superlink.database:"]]
    assert "- profile: **production**" in (folder / "report.md").read_text()
    central, batches = _centralised(cluster, SITES, parse_plan("1->2, 3->5", 6))
    _assert_maps_equal(folder, central)
    images = batches[0][0]
    with torch.no_grad():
        expected = load_compressed(folder)(images)
        for name in SITES:  # every hospital installed exactly the server's maps
            site_maps = cluster["tmp"] / name / "compressed"
            digest = hashlib.sha256((site_maps / "maps.safetensors").read_bytes()).hexdigest()
            assert digest == report["federation"]["maps_sha256"]
            assert torch.equal(load_compressed(site_maps)(images), expected)
            assert json.loads((site_maps / "report.json").read_text())["site"] == {"name": name, "profile": "production"}


def test_production_sites_refuse_a_development_run(cluster):
    run = _run(cluster, "development", {"profile": "development", "plan": "1->2",
                                        "federation": {"num_sites": 3, "min_sites": 1, "round_timeout": 120}})
    out, _ = run.communicate(timeout=600)
    assert not (cluster["tmp"] / "development" / "report.json").exists()
    for name in SITES:  # no fallback: every site refused before reading an image
        assert f"profile: {name} runs in the production profile and refuses a run whose profile is 'development'" in out


def test_private_run_with_secure_aggregation_across_three_hospitals(cluster):
    run = _run(cluster, "private", {"plan": "1->2, 3->5", "privacy": {"epsilon": 8.0, "aggregation": "secure",
                                                                      "public_images": 32},
                                    "federation": {"num_sites": 3, "min_sites": 3, "round_timeout": 300,
                                                   "max_images_per_site": 1000}})
    out, _ = run.communicate(timeout=600)
    folder = cluster["tmp"] / "private"
    assert (folder / "report.json").is_file(), out[-3000:]
    report = json.loads((folder / "report.json").read_text())
    privacy = report["privacy"]
    assert privacy["aggregation"].startswith("secure aggregation") and privacy["sites_summed"] == 3
    assert privacy["noise_sites"] == 3 and privacy["noise"].startswith("secure (CSPRNG")
    statistics = next(r for r in report["federation"]["rounds"] if r["name"].startswith("statistics"))
    assert list(statistics["sites"]) == ["secure sum"]  # the server saw the sum, not a site's reply
    for name in SITES:
        entries = PrivacyLedger(cluster["tmp"] / name / "privacy-ledger.json").entries()
        statistics_entry = [e for e in entries if e.release == "statistics"][-1]
        assert statistics_entry.noise_multiplier == pytest.approx(privacy["noise_multiplier"])
        assert statistics_entry.aggregation == "secure (noise split over 3 sites)"
        assert statistics_entry.noise.startswith("secure")


def test_a_site_killed_mid_run_is_excluded_and_named(cluster):
    victim = cluster["nodes"]["hospital-c"]
    run = _run(cluster, "site-killed", {"budget": {"blocks": 2},
                                        "federation": {"num_sites": 3, "min_sites": 2, "round_timeout": 60}})
    seen = []
    for line in run.stdout:  # the server's streamed log: round 1 is complete once the plan is chosen...
        seen.append(line)
        if "plan chosen from 3 sites' similarity" in line:
            break
    else:
        pytest.fail("the server never finished the similarity round:\n" + "".join(seen[-40:]))
    stop_process(victim["process"])  # ...and hospital-c dies before round 2
    out, _ = run.communicate(timeout=600)
    folder = cluster["tmp"] / "site-killed"
    assert (folder / "report.json").is_file(), out[-3000:]
    rounds = {r["name"]: r["sites"] for r in json.loads((folder / "report.json").read_text())["federation"]["rounds"]}
    assert rounds["similarity"]["hospital-c"]["status"] == "ok"
    missing = [s for s, v in rounds["statistics"].items() if v["status"] == "no reply"]
    assert len(missing) == 1 and "no reply within 60 s" in rounds["statistics"][missing[0]]["reason"]
    assert sorted(rounds["install"]) == ["hospital-a", "hospital-b"]
    report = json.loads((folder / "report.json").read_text())
    central, _ = _centralised(cluster, ("hospital-a", "hospital-b"), parse_plan(report["plan"], 6))
    _assert_maps_equal(folder, central)
