"""A real deployment on loopback: flower-superlink with TLS and SuperNode authentication, three
flower-supernode processes each reading its own site YAML, and `flwr run`; one site's data is broken.

This is the sequence docs/deployment.md gives to hospitals, run end to end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tba_fed import ModelConfig, ViTAdapter, load_compressed, solve_plan
from tba_fed.calibrate import collect_span_stats
from tba_fed.config import DataConfig
from tba_fed.data import build_dataset, calibration_split, make_loader
from tba_fed.federation.simulate import app_directory, flower_env, free_port, local_superlink
from tba_fed.models import create_model
from tba_fed.plan import parse_plan

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    home = tmp / "flwr-home"
    home.mkdir()
    certs = tmp / "certs"
    subprocess.run(["bash", str(REPO / "scripts/make-certificates.sh"), str(certs), "127.0.0.1",
                    "hospital-a", "hospital-b", "hospital-c"], check=True, capture_output=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "hospitals"\n\n[superlink.hospitals]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n')
    env = flower_env(home)
    model = {"name": "vit_tiny_patch16_224", "kwargs": TINY}
    sites = {}
    for seed, name in enumerate(("hospital-a", "hospital-b", "hospital-c"), start=1):
        data = {"source": "synthetic", "num_images": 24, "seed": seed, "batch_size": 8, "holdout_fraction": 0.25}
        if name == "hospital-c":
            data = {"source": "image_folder", "path": str(tmp / "missing-folder")}
        sites[name] = _write(tmp / f"{name}.yaml", {"name": name, "data": data, "output": str(tmp / name)})
    run = _write(tmp / "run.yaml", {"model": model, "plan": "1->2, 3->5",
                                    "federation": {"num_sites": 3, "min_sites": 2, "round_timeout": 120},
                                    "output": str(tmp / "server")})
    with contextlib.ExitStack() as stack:
        stack.enter_context(local_superlink(home, port, certificates=certs, node_auth=True))
        for name in sites:
            subprocess.run([str(BIN / "flwr"), "supernode", "register", str(certs / f"{name}.key.pub"), "hospitals"],
                           env=env, check=True, capture_output=True)
        for name, site_yaml in sites.items():
            log = stack.enter_context(open(tmp / f"{name}.log", "w"))
            node = subprocess.Popen(
                [str(BIN / "flower-supernode"), "--root-certificates", str(certs / "ca.crt"),
                 "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                 "--auth-supernode-private-key", str(certs / f"{name}.key"),
                 "--node-config", f'site-config="{site_yaml}"'], env=env, stdout=log, stderr=subprocess.STDOUT)
            stack.callback(lambda p=node: (p.terminate(), p.wait(timeout=20)))
        result = subprocess.run([str(BIN / "flwr"), "run", str(app_directory()), "hospitals", "--stream",
                                 "--run-config", f'config-path="{run}"'], env=env, cwd=REPO, capture_output=True,
                                text=True, timeout=600)
    return tmp, result, sites


def test_deployment_with_tls_and_node_auth_excludes_the_broken_site(deployment):
    tmp, result, sites = deployment
    report = json.loads((tmp / "server" / "report.json").read_text())
    statistics = next(r for r in report["federation"]["rounds"] if r["name"] == "statistics")
    assert statistics["sites"]["hospital-a"]["status"] == "ok"
    assert statistics["sites"]["hospital-b"]["status"] == "ok"
    broken = [s for s, v in statistics["sites"].items() if v["status"] == "error"]
    assert len(broken) == 1 and "missing-folder" in statistics["sites"][broken[0]]["reason"]
    # both healthy sites installed exactly the server's maps, byte for byte
    for name in ("hospital-a", "hospital-b"):
        digest = hashlib.sha256((tmp / name / "compressed" / "maps.safetensors").read_bytes()).hexdigest()
        assert digest == report["federation"]["maps_sha256"]
    assert not (tmp / "hospital-c" / "compressed").exists()


def test_deployed_maps_equal_centralised_on_the_healthy_sites(deployment):
    tmp, _, sites = deployment
    model = create_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY))
    adapter = ViTAdapter(model)
    plan = parse_plan("1->2, 3->5", 6)
    batches = []
    for name in ("hospital-a", "hospital-b"):
        data = DataConfig.model_validate(yaml.safe_load(sites[name].read_text())["data"])
        calibration, _ = calibration_split(build_dataset(data, model), data)
        batches += list(make_loader(calibration, data))
    central = solve_plan(collect_span_stats(adapter, batches, plan.spans), bias=True)
    maps = load_file(str(tmp / "server" / "maps.safetensors"))
    for span in plan.spans:
        for name, expected in (("weight", central[span].map.weight), ("bias", central[span].map.bias)):
            got = maps[f"span.{span.key}.{name}"]
            assert float((got - expected).norm() / expected.norm()) < 1e-9
    images = next(iter(batches))[0]
    with torch.no_grad():
        assert torch.equal(load_compressed(tmp / "server")(images), load_compressed(tmp / "hospital-a" / "compressed")(images))
