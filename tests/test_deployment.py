"""A real deployment on loopback in the production profile: `tba-fed superlink` (flower-superlink with TLS,
SuperNode authentication and a database; it registers the sites' keys), three `tba-fed supernode` processes
each reading its own site YAML, and `flwr run` (or `tba-fed submit`), the sequence docs/deployment.md gives. Every
process started here is stopped by pid, pass or fail."""

from __future__ import annotations

import hashlib
import json

import pytest
import tomli
import torch

from safetensors.torch import load_file

from tba_fed import load_compressed
from tba_fed.audit import check_chain
from tba_fed.cli import main
from tba_fed.federation.audit_check import cross_check
from tba_fed.federation.wire import payload_sha256
from tba_fed.plan import parse_plan
from tba_fed.privacy.ledger import PrivacyLedger

from cluster import MODEL, SITES, Cluster, assert_maps_equal, run_id, wait_for_line
from conftest import TINY

pytestmark = pytest.mark.slow  # a real SuperLink and SuperNodes with TLS on loopback


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    deployment = Cluster(tmp_path_factory.mktemp("deploy"))
    try:
        yield deployment
    finally:
        deployment.close()


def test_three_hospitals_with_tls_and_node_auth(cluster):
    run = cluster.run("all-sites", {"plan": "1->2, 3->5",
                                      "federation": {"num_sites": 3, "min_sites": 3, "round_timeout": 300}})
    out, _ = run.communicate(timeout=600)
    folder = cluster.tmp / "all-sites"
    assert (folder / "report.json").is_file(), out[-3000:]
    report = json.loads((folder / "report.json").read_text())
    for rnd in report["federation"]["rounds"]:
        assert sorted(rnd["sites"]) == list(SITES) and {v["status"] for v in rnd["sites"].values()} == {"ok"}
    # the production ServerApp checked the running SuperLink itself before round 1, and says so
    assert report["profile"] == "production"
    assert [line.split()[:2] for line in report["superlink_checks"]] == [
        ["OK", "superlink.certificates:"], ["OK", "superlink.node_auth:"], ["OK", "superlink.database:"]]
    assert "- profile: **production**" in (folder / "report.md").read_text()
    central, batches = cluster.centralised(SITES, parse_plan("1->2, 3->5", 6))
    assert_maps_equal(folder, central)
    images = batches[0][0]
    with torch.no_grad():
        expected = load_compressed(folder)(images)
        for name in SITES:  # every hospital installed exactly the server's maps
            site_maps = cluster.tmp / name / "compressed"
            digest = hashlib.sha256((site_maps / "maps.safetensors").read_bytes()).hexdigest()
            assert digest == report["federation"]["maps_sha256"]
            assert torch.equal(load_compressed(site_maps)(images), expected)
            assert json.loads((site_maps / "report.json").read_text())["site"] == {"name": name, "profile": "production"}
    # every hospital's audit log and the server's verify, each against the other, and agree on the payloads
    server_log = cluster.tmp / "all-sites.audit.jsonl"
    server = check_chain(server_log)
    assert server.ok and [e["round"] for e in server.entries] == ["statistics", "install", "result"]
    sent_maps = payload_sha256({k: v.numpy() for k, v in load_file(str(folder / "maps.safetensors")).items()})
    for name in SITES:
        site_log = cluster.tmp / name / "audit.jsonl"
        assert main(["audit", "verify", str(site_log), "--against", str(server_log)]) == 0
        assert main(["audit", "verify", str(server_log), "--against", str(site_log)]) == 0
        problems, matched = cross_check(check_chain(site_log), server)
        assert problems == [] and matched.startswith("2 site heads and 2 site requests matched")
        site = {e["round"]: e for e in check_chain(site_log).entries if e["run_id"] == server.entries[0]["run_id"]}
        assert site["statistics"]["sent_sha256"] == server.entries[0]["sites"][name]["received_sha256"]
        assert site["statistics"]["sent"] == server.entries[0]["sites"][name]["received"]
        assert site["install"]["received"]["maps"]["sha256"] == sent_maps
        assert site["install"]["hash"] == server.entries[1]["sites"][name]["site_head"]


def test_production_sites_refuse_a_development_run(cluster):
    run = cluster.run("development", {"profile": "development", "plan": "1->2",
                                      "federation": {"num_sites": 3, "min_sites": 1, "round_timeout": 120}})
    out, _ = run.communicate(timeout=600)
    assert not (cluster.tmp / "development" / "report.json").exists()
    for name in SITES:  # no fallback: every site refused before reading an image
        assert f"profile: {name} runs in the production profile and refuses a run whose profile is 'development'" in out


def test_production_sites_refuse_a_run_for_another_model(cluster):
    other = {**MODEL, "kwargs": {**TINY, "depth": 5}}
    run = cluster.run("other-model", {"model": other, "plan": "1->2",
                                      "federation": {"num_sites": 3, "min_sites": 1, "round_timeout": 120}})
    out, _ = run.communicate(timeout=600)
    assert not (cluster.tmp / "other-model" / "report.json").exists()
    asked, declared = (json.dumps(m["kwargs"], sort_keys=True) for m in (other, MODEL))
    for name in SITES:  # each refused before building the model or reading an image, and logged it
        refusal = (f"model: {name} serves only the model its site YAML declares, and this run asks for another: "
                   f"kwargs {asked} requested, {declared} declared")
        assert refusal in out, out[-3000:]
        entry = check_chain(cluster.tmp / name / "audit.jsonl").entries[-1]
        assert entry["status"] == "refused" and entry["error"].startswith(f"SiteRefusal: {refusal} (run it with")


def test_private_run_with_secure_aggregation_across_three_hospitals(cluster):
    # clip_scale 8 keeps every synthetic image unclipped (weight 1): at the default scale each was clipped to
    # about 1/5, the summed count (~6.5 images) then rounded below one image under the count's noise (std 4.05)
    # with probability 7% and the run stopped. Unclipped, the ~36 calibration images make that ~1e-14.
    run = cluster.run("private", {"plan": "1->2, 3->5", "privacy": {"epsilon": 8.0, "aggregation": "secure",
                                                                      "public_images": 32, "clip_scale": 8.0},
                                    "federation": {"num_sites": 3, "min_sites": 3, "round_timeout": 300,
                                                   "max_images_per_site": 1000}})
    out, _ = run.communicate(timeout=600)
    folder = cluster.tmp / "private"
    assert (folder / "report.json").is_file(), out[-3000:]
    report = json.loads((folder / "report.json").read_text())
    privacy = report["privacy"]
    assert privacy["aggregation"].startswith("secure aggregation") and privacy["sites_summed"] == 3
    assert privacy["noise_sites"] == 3 and privacy["noise"].startswith("secure (CSPRNG")
    statistics = next(r for r in report["federation"]["rounds"] if r["name"].startswith("statistics"))
    assert list(statistics["sites"]) == ["secure sum"]  # the server saw the sum, not a site's reply
    for name in SITES:
        entries = PrivacyLedger(cluster.tmp / name / "privacy-ledger.json").entries()
        statistics_entry = [e for e in entries if e.release == "statistics"][-1]
        assert statistics_entry.noise_multiplier == pytest.approx(privacy["noise_multiplier"])
        assert statistics_entry.aggregation == "secure (noise split over 3 sites)"
        assert statistics_entry.noise.startswith("secure")
        # the secure round is on both records: the config each site received is the one the server sent
        site_log, server_log = cluster.tmp / name / "audit.jsonl", cluster.tmp / "private.audit.jsonl"
        problems, matched = cross_check(check_chain(site_log), check_chain(server_log))
        assert problems == [] and matched.startswith("1 site heads and 2 site requests matched")
        secure = [e for e in check_chain(site_log).entries if e["round"] == "statistics (secure aggregation)"][-1]
        assert secure["status"] == "ok" and secure["grant"]["aggregation"] == "secure (noise split over 3 sites)"
    server_round = check_chain(cluster.tmp / "private.audit.jsonl").entries[0]
    assert server_round["sites"]["secure sum"]["sites_summed"] == 3


def test_a_site_killed_mid_run_is_excluded_and_named(cluster):
    run = cluster.run("site-killed", {"budget": {"blocks": 2},
                                      "federation": {"num_sites": 3, "min_sites": 2, "round_timeout": 60}})
    seen: list[str] = []
    wait_for_line(run, "plan chosen from 3 sites' similarity", seen)  # round 1 is complete once the plan is chosen...
    cluster.stop_node("hospital-c")  # ...and hospital-c dies before round 2
    try:
        out, _ = run.communicate(timeout=600)
    finally:
        cluster.start_node("hospital-c")  # back for the tests after this one (same key, same node id)
    folder = cluster.tmp / "site-killed"
    assert (folder / "report.json").is_file(), out[-3000:]
    rounds = {r["name"]: r["sites"] for r in json.loads((folder / "report.json").read_text())["federation"]["rounds"]}
    assert rounds["similarity"]["hospital-c"]["status"] == "ok"
    assert rounds["statistics"]["hospital-c"]["status"] == "error"  # the SuperLink says why: the node is offline
    assert rounds["statistics"]["hospital-c"]["reason"].startswith("site error 5: Error: Node Unavailable")
    assert sorted(rounds["install"]) == ["hospital-a", "hospital-b"]
    report = json.loads((folder / "report.json").read_text())
    central, _ = cluster.centralised(("hospital-a", "hospital-b"), parse_plan(report["plan"], 6))
    assert_maps_equal(folder, central)


def test_tba_fed_submit_adds_the_connection_and_exits_by_the_runs_outcome(cluster):
    """The coordinator's one command: the connection comes from the run YAML (added beside the existing ones),
    the log is streamed, and the exit code says whether the run completed with a new report."""
    flower_config = cluster.home / "config.toml"
    before = tomli.loads(flower_config.read_text())
    run = cluster.submit("submitted", {"plan": "1->2, 3->5",
                                       "federation": {"num_sites": 3, "min_sites": 3, "round_timeout": 300}},
                         "--connection", "coordinator")
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out[-3000:]
    number = run_id(out.splitlines())
    assert f"run {number} completed; report in {cluster.tmp / 'submitted' / 'report.json'}" in out
    added = {"address": f"127.0.0.1:{cluster.port}", "root-certificates": str((cluster.certs / "ca.crt").resolve())}
    assert tomli.loads(flower_config.read_text()) == {**before, "superlink": {**before["superlink"], "coordinator": added}}
    report = json.loads((cluster.tmp / "submitted" / "report.json").read_text())
    assert report["profile"] == "production" and [line.split()[0] for line in report["superlink_checks"]] == ["OK"] * 3
    for rnd in report["federation"]["rounds"]:
        assert sorted(rnd["sites"]) == list(SITES) and {v["status"] for v in rnd["sites"].values()} == {"ok"}
    central, _ = cluster.centralised(SITES, parse_plan("1->2, 3->5", 6))
    assert_maps_equal(cluster.tmp / "submitted", central)
    assert cluster.run_status(number) == ("finished:completed", "N/A")

    # a run every site refuses: flwr run's stream ends normally, submit says the run failed and exits 1
    refused = cluster.submit("submit-refused", {"profile": "development", "plan": "1->2",
                                                "federation": {"num_sites": 3, "min_sites": 1, "round_timeout": 120}},
                             "--connection", "coordinator")
    out, _ = refused.communicate(timeout=600)
    number = run_id(out.splitlines())
    assert refused.returncode == 1 and f"tba-fed: error: run {number} is finished:failed" in out, out[-3000:]
    assert not (cluster.tmp / "submit-refused").exists()
