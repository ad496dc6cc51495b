"""The server's rounds against in-process sites (a stand-in Grid that calls tba_fed's real site
functions): faulty replies are rejected and named, silent sites time out, too few sites fail clearly.
The real Flower runtime is exercised by test_simulation.py and test_deployment.py."""

from __future__ import annotations

import hashlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from flwr.app import ConfigRecord, RecordDict

from tba_fed import ModelConfig, ViTAdapter, solve_plan
from tba_fed.audit import check_chain
from tba_fed.calibrate import collect_span_stats
from tba_fed.federation.config import load_federated_config
from tba_fed.federation.envelope import echo
from tba_fed.federation.flower_internals import serverapp_identity
from tba_fed.federation.records import from_record, to_record
from tba_fed.errors import FederationError
from tba_fed.federation.server import run_server
from tba_fed.federation.config import FederationConfig
from tba_fed.federation.site import Site, answer, cached_model, run_spec
from tba_fed.privacy.accounting import noise_multiplier
from tba_fed.privacy.ledger import PrivacyLedger
from tba_fed.privacy.policy import SitePolicy
from tba_fed.errors import TBAInputError
from tba_fed.plan import parse_plan

from answering_grid import AnsweringGrid
from cluster import assert_maps_equal
from conftest import TINY, loader

MODEL = ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY)


@pytest.fixture(autouse=True)
def server_identity():
    """Flower stamps outgoing messages with the ServerApp's run and task ids; outside a run there are
    none, so give the process the identity a ServerApp would have (internal API, test-only)."""
    with serverapp_identity(run_id=1):
        yield


def _corrupt(kind: str):
    def apply(arrays: dict) -> dict:
        key = "calibration/1-2/"
        if kind == "shape":
            arrays[key + "sum_x"] = np.zeros(7)
        elif kind == "nan":
            arrays[key + "cross"] = arrays[key + "cross"].copy()
            arrays[key + "cross"][0, 0] = np.nan
        elif kind == "negative":
            arrays[key + "images"] = np.array([-4.0])
        elif kind == "non-psd":
            arrays[key + "gram_triu"] = -arrays[key + "gram_triu"]
        return arrays
    return apply


class InProcessGrid(AnsweringGrid):
    """Answers each message like a ClientApp would, from tba_fed's site functions."""

    run = SimpleNamespace(run_id=1)

    def __init__(self, tmp_path, behaviours: dict[int, str], policy: SitePolicy | None = None, images: int = 24) -> None:
        super().__init__()
        self.behaviours = behaviours
        policy = policy or FederationConfig().site_policy
        self.sites = {node: Site(f"site-{node}", loader(images, seed=node), loader(8, seed=100 + node),
                                 tmp_path / f"site-{node}",
                                 policy.model_copy(update={"ledger": tmp_path / f"site-{node}" / "ledger.json"}))
                      for node in behaviours}
        self.received: list[dict] = []

    def get_node_ids(self):
        return list(self.behaviours)

    def answer(self, messages):
        replies = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, self.behaviours[msg.metadata.dst_node_id]
            if kind == "silent":
                continue
            config = msg.content.config_records["config"]
            site = self.sites[node]
            statistics = msg.metadata.message_type.endswith(".statistics")
            if kind == "crash" and statistics:
                replies.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: True,
                                               error=SimpleNamespace(code=0, reason="ClientApp raised: disk failure")))
                continue
            try:  # the ClientApp's own routing, with this stand-in's sites
                records = answer(msg, cached_model(str(config["model"])), site, run_spec("run-1", dict(config)))
            except TBAInputError as err:  # what Flower does with a ClientApp exception: an error reply, no content
                if not statistics:
                    raise
                replies.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: True,
                                               error=SimpleNamespace(code=0, reason=f"ClientApp raised: {err}")))
                continue
            if statistics:
                records["statistics"] = to_record(_corrupt(kind)(from_record(records["statistics"])))
            content = RecordDict({"meta": ConfigRecord({"site": site.name, **echo(msg)}), **records})
            replies.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False,
                                           content=content))
        return replies


def exact_two_site_run(tmp_path, map_kind: str) -> dict:
    """Plan 1->2, 3->5 on two in-process sites (24 calibration images each), exact sums, evaluation on: the report."""
    grid = InProcessGrid(tmp_path, {1: "good", 2: "good"})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL.model_dump(mode="json"), "plan": "1->2, 3->5", "map": map_kind,
                                    "federation": {"num_sites": 2, "min_sites": 2, "round_timeout": 5},
                                    "evaluation": {"enabled": True}, "output": str(tmp_path / "server")}))
    return run_server(grid, load_federated_config(path))


def _config(tmp_path, **federation):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL.model_dump(mode="json"), "plan": "1->2, 3->5",
                                    "federation": {"num_sites": 7, "min_sites": 2, "round_timeout": 5, **federation},
                                    "evaluation": {"enabled": True}, "output": str(tmp_path / "server")}))
    return load_federated_config(path)


def test_faulty_sites_are_rejected_named_and_excluded(tmp_path):
    behaviours = {1: "good", 2: "good", 3: "shape", 4: "nan", 5: "negative", 6: "non-psd", 7: "silent", 8: "crash"}
    grid = InProcessGrid(tmp_path, behaviours)
    report = run_server(grid, _config(tmp_path, num_sites=8))
    rounds = {r["name"]: r["sites"] for r in report["federation"]["rounds"]}
    stats = rounds["statistics"]
    assert {s for s, v in stats.items() if v["status"] == "ok"} == {"site-1", "site-2"}
    assert "shape" in stats["site-3"]["reason"] and stats["site-3"]["status"] == "rejected"
    assert "NaN" in stats["site-4"]["reason"]
    assert "non-negative integer" in stats["site-5"]["reason"]
    assert "positive semi-definite" in stats["site-6"]["reason"]
    assert stats["node-7"]["status"] == "no reply"
    assert stats["node-8"]["status"] == "error" and "disk failure" in stats["node-8"]["reason"]
    # later rounds only involve the sites whose statistics were used
    assert set(rounds["install"]) == set(rounds["accuracy"]) == {"site-1", "site-2"}
    # the maps are those of the two valid sites' data, nothing of the rejected ones
    model = cached_model(MODEL.model_dump_json())
    batches = list(loader(24, seed=1)) + list(loader(24, seed=2))
    plan = parse_plan("1->2, 3->5", 6)
    central = solve_plan(collect_span_stats(ViTAdapter(model), batches, plan.spans), bias=True)
    assert_maps_equal(tmp_path / "server", central)
    assert report["evaluation"]["test_images"] == 16
    assert "| site-3 | rejected |" in (tmp_path / "server" / "report.md").read_text()
    # the server's audit log, beside its output: one entry per round and one for the result
    audit = check_chain(tmp_path / "server.audit.jsonl")
    assert audit.ok and [e["round"] for e in audit.entries] == ["statistics", "install", "probe", "accuracy", "result"]
    sent = audit.entries[0]["sites"]
    assert {name: record["status"] for name, record in sent.items()} == {name: v["status"] for name, v in stats.items()}
    assert len({record["sent_sha256"] for record in sent.values()}) == 1  # every site was asked the same
    assert "received_sha256" not in sent["node-7"] and "received_sha256" not in sent["node-8"]
    assert sent["site-3"]["received"]["statistics:calibration/1-2/sum_x"] == [7]  # a rejected reply is on record too
    assert sent["site-1"]["received"] == stats["site-1"]["received"]
    result = audit.entries[-1]
    assert result["maps_sha256"] == report["federation"]["maps_sha256"]
    assert result["report_sha256"] == hashlib.sha256((tmp_path / "server" / "report.json").read_bytes()).hexdigest()


def test_only_named_aggregates_reach_the_server(tmp_path):
    report = run_server(InProcessGrid(tmp_path, {1: "good", 2: "good"}), _config(tmp_path, num_sites=2))
    allowed = {"statistics": {"gram_triu": [48 * 49 // 2], "cross": [48, 48], "sum_x": [48], "sum_y": [48],
                              "sum_yy": [1], "tokens": [1], "images": [1]},
               "probe": {"gram_triu": [48 * 49 // 2], "cross": [48, 10], "sum_f": [48], "class_counts": [10],
                         "tokens": [1], "images": [1]}}
    seen = 0
    for rnd in report["federation"]["rounds"]:
        for entry in rnd["sites"].values():
            for key, shape in entry.get("received", {}).items():
                record, name = key.split(":", 1)
                assert shape == allowed[record][name.rsplit("/", 1)[1]], (key, shape)
                seen += 1
    assert seen == 2 * (2 * 2 * 7 + 2 * 6)  # 2 sites x (2 splits x 2 spans x 7 sums + 2 models x 6 sums)


def test_too_few_sites_fail_with_a_clear_message(tmp_path):
    with pytest.raises(FederationError, match=r"round statistics: 1 valid replies, min_sites is 2.*site-2: rejected"):
        run_server(InProcessGrid(tmp_path, {1: "good", 2: "nan"}), _config(tmp_path, num_sites=2))
    assert not (tmp_path / "server").exists()
    failed = check_chain(tmp_path / "server.audit.jsonl").entries[-1]  # the failed round is on record
    assert failed["round"] == "statistics" and failed["sites"]["site-2"]["status"] == "rejected"


def test_private_run_reports_privacy_priors_and_every_site_ledgers_its_releases(tmp_path):
    grid = InProcessGrid(tmp_path, {1: "good", 2: "good", 3: "good"}, images=40)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": MODEL.model_dump(mode="json"), "plan": "1->2, 3->5",
        "federation": {"num_sites": 3, "min_sites": 2, "round_timeout": 5},
        "evaluation": {"enabled": True}, "privacy": {"epsilon": 4.0, "seed": 11, "public_images": 32},
        "output": str(tmp_path / "server")}))
    report = run_server(grid, load_federated_config(path))
    privacy = report["privacy"]
    assert privacy["releases"] == ["statistics", "probe", "accuracy"]
    assert privacy["noise_multiplier"] == pytest.approx(noise_multiplier(4.0, 1e-5, 3))
    assert "seeded" in privacy["noise"] and report["prior"] == "public"
    assert set(report["prior_comparison"]) == {"1->2", "3->5"}
    assert set(report["prior_comparison"]["1->2"]) == {"identity", "public prior", "federated", "federated + public prior"}
    assert report["prior_comparison"]["1->2"]["identity"] == pytest.approx(1.0)
    spread = report["prior_comparison_std"]["1->2"]
    assert set(spread) == set(report["prior_comparison"]["1->2"]) and spread["federated"] > 0
    for site in grid.sites.values():
        entries = PrivacyLedger(site.policy.ledger).entries()
        assert [e.release for e in entries] == ["statistics", "probe", "accuracy"]
        assert all(e.noise_multiplier == pytest.approx(privacy["noise_multiplier"]) for e in entries)
        assert entries[0].noise_std["1->2:gram"] == pytest.approx(
            privacy["noise_multiplier"] * privacy["clip_spans"]["1->2"][0] / math.sqrt(0.45 / 2))
    assert "## Privacy" in (tmp_path / "server" / "report.md").read_text()


def test_sites_refuse_a_run_outside_their_policy_and_the_run_fails_naming_them(tmp_path):
    policy = SitePolicy(epsilon=0.5, min_images=10, releases=("statistics",))
    grid = InProcessGrid(tmp_path, {1: "good", 2: "good", 3: "good"}, policy=policy, images=40)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": MODEL.model_dump(mode="json"), "plan": "1->2",
        "federation": {"num_sites": 3, "min_sites": 2, "round_timeout": 5},
        "privacy": {"epsilon": 1.0, "public_images": 32}, "output": str(tmp_path / "server")}))
    with pytest.raises(FederationError) as err:
        run_server(grid, load_federated_config(path))
    assert str(err.value).count("exceeds the site's total budget 0.5") == 3
    for site in grid.sites.values():
        assert not site.policy.ledger.exists()  # nothing was released, nothing was spent
    assert not (tmp_path / "server").exists()


def test_a_private_budget_run_releases_noisy_similarity_first_and_ledgers_both_releases(tmp_path):
    grid = InProcessGrid(tmp_path, {1: "good", 2: "good"}, images=40)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": MODEL.model_dump(mode="json"), "budget": {"blocks": 2},
        "federation": {"num_sites": 2, "min_sites": 2, "round_timeout": 5},
        "privacy": {"epsilon": 8.0, "seed": 3, "public_images": 32}, "output": str(tmp_path / "server")}))
    report = run_server(grid, load_federated_config(path))
    assert report["privacy"]["releases"] == ["similarity", "statistics"]
    assert report["privacy"]["noise_multiplier"] == pytest.approx(noise_multiplier(8.0, 1e-5, 2))
    for site in grid.sites.values():
        entries = PrivacyLedger(site.policy.ledger).entries()
        assert [e.release for e in entries] == ["similarity", "statistics"]
        assert entries[0].noise_std["sq_dist"] > 0 and entries[0].noise_multiplier == entries[1].noise_multiplier


def test_a_private_count_that_noise_takes_to_zero_stops_the_run_with_its_reason(tmp_path):
    """The released image count is noisy; when it rounds below one image the server names the cause and the fix
    (it used to fail inside the solver with "no calibration tokens"). Seeded noise makes this draw certain."""
    grid = InProcessGrid(tmp_path, {1: "good", 2: "good", 3: "good"}, images=4)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": MODEL.model_dump(mode="json"), "plan": "1->2, 3->5",
        "federation": {"num_sites": 3, "min_sites": 2, "round_timeout": 5},
        "privacy": {"epsilon": 1.0, "seed": 3, "public_images": 32},
        "output": str(tmp_path / "server")}))
    with pytest.raises(TBAInputError, match=r"privacy: the released calibration image count is -?\d+\.\d \(noise std "
                                            r"\d+\.\d\).*add images, raise epsilon or clip_scale"):
        run_server(grid, load_federated_config(path))
    assert not (tmp_path / "server" / "report.json").exists()
