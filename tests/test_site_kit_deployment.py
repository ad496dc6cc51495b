"""Three hospitals on loopback, each made from its own `tba-fed site init` kit (its key pair made there), the
coordinator holding and registering only their public keys: `tba-fed connect` then `flwr supernode list` (the
runbook's order), `tba-fed status` healthy before, during and after a private run with secure aggregation in the
templates' federation (3 sites, min_sites 2), and that run surviving one hospital's dropout."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time

import pytest

from tba_fed.cli import main
from tba_fed.federation.config import load_site_config
from tba_fed.privacy.ledger import PrivacyLedger

from cluster import BIN, SITES, Cluster, run_id

pytestmark = pytest.mark.slow  # a real SuperLink and three SuperNodes with TLS on loopback

# the federation of configs/deployment/run.yaml: secure aggregation, noise split over min_sites = 2 of 3; a large
# budget and clipping bounds (clip_scale 8, as tests/test_deployment.py) so 12 images a site keep a usable count
RUN = {"plan": "1->2, 3->5", "privacy": {"epsilon": 8.0, "aggregation": "secure", "public_images": 32, "clip_scale": 8.0},
       "federation": {"num_sites": 3, "min_sites": 2, "round_timeout": 300, "max_images_per_site": 1000}}


def status(path, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["status", str(path)])
    return code, capsys.readouterr().out.splitlines()


def wait_online(cluster: Cluster, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(cluster.online_nodes()) != count:
        assert time.monotonic() < deadline, f"{count} SuperNodes never came online"
        time.sleep(2)


def test_three_hospitals_from_site_kits(tmp_path, capsys, monkeypatch):
    cluster = Cluster(tmp_path, kits=True)
    try:
        # the coordinator never held a site's private key; each stays in its kit, 0600
        assert sorted(p.name for p in cluster.certs.glob("*.key")) == ["ca.key", "server.key"]
        for name in SITES:
            key = tmp_path / name / "keys" / f"{name}.key"
            assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
            assert cluster.superlink_config["sites"][name] == f"{key}.pub"  # the run YAML lists what the site sent
        wait_online(cluster, 3)
        run_yaml = cluster.run_yaml("kits", RUN)

        # runbook step 2: the connection first (tba-fed connect), then Flower's own listing through it
        monkeypatch.setenv("FLWR_HOME", str(cluster.home))
        assert main(["connect", str(run_yaml), "--connection", "kits"]) == 0
        listed = subprocess.run([str(BIN / "flwr"), "supernode", "list", "kits", "--format", "json"], env=cluster.env,
                                capture_output=True, text=True, timeout=120)
        assert sorted(n["status"] for n in json.loads(listed.stdout)["nodes"]) == ["online"] * 3, listed.stdout

        code, lines = status(run_yaml, capsys)
        assert code == 0, lines
        for name in SITES:
            assert any(line.startswith(f"OK      superlink.sites.{name}: {name}: node ") and
                       line.endswith("registered and connected") for line in lines), lines
        assert "OK      federation: 3 of 3 listed sites connected; a run waits for num_sites 3 and completes with " \
               "min_sites 2" in lines
        assert "NOTE    runs: none yet" in lines and lines[-1] == f"status {run_yaml}: healthy"
        for name in SITES:
            code, lines = status(tmp_path / name / "site.yaml", capsys)
            assert code == 0 and any(line.startswith("OK      privacy: releases ") and "ε 0.0000 spent of 20, 20.0000 left"
                                     in line for line in lines), lines

        # the run, by tba-fed submit; status is healthy while it runs
        submit = cluster.submit("kits", RUN, "--connection", "kits")
        seen = []
        for line in submit.stdout:
            seen.append(line)
            if "Successfully started run" in line:
                break
        number = run_id(seen)
        code, lines = status(run_yaml, capsys)
        assert code == 0 and any(line.startswith(f"OK      runs: run {number}: ") for line in lines), lines
        out, _ = submit.communicate(timeout=900)
        assert submit.returncode == 0, "".join(seen) + out[-3000:]
        # the server names the sites it waits for as the SuperLink registered them (the statistics round is secure:
        # SecAgg+ says nothing per site; install is the first round the sites answer one by one)
        assert re.search(r"install: [0-2]/3 sites replied, waiting for hospital-\w(, hospital-\w)*, \d+ s left", out), out[-3000:]
        assert "waiting for node-" not in out
        report = json.loads((tmp_path / "kits" / "report.json").read_text())
        assert report["privacy"]["sites_summed"] == 3 and report["privacy"]["noise_sites"] == 2

        code, lines = status(run_yaml, capsys)
        assert code == 0 and any(line.startswith(f"OK      runs: run {number}: finished:completed") for line in lines)
        assert any(line.startswith(f"OK      audit: {tmp_path / 'kits.audit.jsonl'}: ") and "chain intact" in line
                   for line in lines), lines
        for name in SITES:
            site = load_site_config(tmp_path / name / "site.yaml")
            spent = PrivacyLedger(site.privacy.ledger).spent(site.privacy.delta, site.privacy.accountant)
            assert 0 < spent <= 8.0
            code, lines = status(tmp_path / name / "site.yaml", capsys)
            assert code == 0, lines
            assert any(f"ε {spent:.4f} spent of 20, {20 - spent:.4f} left" in line for line in lines), lines
            assert any(line.startswith(f"OK      audit: {site.audit_log}: ") for line in lines), lines

        # one hospital drops out: still healthy enough for min_sites, and the templates' run completes without it
        cluster.stop_node("hospital-c")
        wait_online(cluster, 2)
        code, lines = status(run_yaml, capsys)
        assert code == 0 and any(line.startswith("NOTE    superlink.sites.hospital-c: hospital-c: node ") for line in lines)
        assert any(line.startswith("NOTE    federation: 2 of 3 listed sites connected") for line in lines), lines
        code, lines = status(tmp_path / "hospital-c" / "site.yaml", capsys)
        assert code == 1 and any(line.startswith("PROBLEM connection.auth_key: hospital-c is registered as node ")
                                 for line in lines), lines
        dropout = cluster.submit("dropout", {**RUN, "federation": {**RUN["federation"], "round_timeout": 200}},
                                 "--connection", "kits")
        out, _ = dropout.communicate(timeout=900)
        assert dropout.returncode == 0, out[-3000:]
        report = json.loads((tmp_path / "dropout" / "report.json").read_text())
        assert report["privacy"]["sites_summed"] == 2 and report["privacy"]["noise_sites"] == 2
    finally:
        cluster.close()
