"""Real Flower simulations (flower-superlink --simulation, Ray): federated maps equal the centralised ones."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.utils.data import Subset

from tba_fed import ModelConfig, ViTAdapter, load_compressed, solve_plan
from tba_fed.audit import check_chain
from tba_fed.calibrate import collect_span_stats
from tba_fed.cli import main
from tba_fed.data import build_dataset, make_loader
from tba_fed.errors import strip_escapes
from tba_fed.federation.audit_check import cross_check
from tba_fed.federation.config import FederatedRunConfig, load_federated_config
from tba_fed.deploy.simulate import simulate
from tba_fed.federation.site import simulated_indices
from tba_fed.federation.site_privacy import noise_source
from tba_fed.models import create_model
from tba_fed.plan import parse_plan
from tba_fed.privacy.ledger import PrivacyLedger
from tba_fed.privacy.passes import collect_clipped_span_sums
from tba_fed.privacy.policy import PrivacyRequest
from tba_fed.privacy.public_prior import public_prior_maps
from tba_fed.privacy.release import noisy_spans
from tba_fed.privacy.sensitivity import span_parts
from tba_fed.privacy.solve import private_inputs
from tba_fed.probe import accuracy, collect_probe_stats, solve_probe
from tba_fed.public_images import public_loader
from tba_fed.solver import solve_span

from conftest import TINY

pytestmark = pytest.mark.slow  # Flower's simulation engine (flower-superlink --simulation, Ray)


def _config(tmp_path, num_sites: int, scheme: str) -> dict:
    return {
        "model": {"name": "vit_tiny_patch16_224", "kwargs": TINY},
        # 120 images: with Dirichlet(0.1) shares and each image held out with probability 0.2 (decided from its bytes
        # alone), every site's calibration and held-out parts hold at least one image (60 left a part empty, which
        # the sites' policy, min_images 1, refuses)
        "data": {"source": "synthetic", "num_images": 120, "holdout_fraction": 0.2, "batch_size": 10, "seed": 3},
        "budget": {"blocks": 2},
        "federation": {"num_sites": num_sites, "partition": {"scheme": scheme, "alpha": 0.1, "seed": 7},
                       "min_sites": num_sites, "round_timeout": 300},
        "evaluation": {"enabled": True, "num_classes": 10},
        "output": str(tmp_path / "out"),
    }


@pytest.mark.parametrize("num_sites,scheme", [(1, "iid"), (2, "iid"), (5, "iid"), (1, "dirichlet"), (2, "dirichlet"),
                                              (5, "dirichlet")])
def test_federated_maps_equal_centralised(tmp_path, num_sites, scheme):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, num_sites, scheme)))
    report, output = simulate(path)
    assert report["federation"]["sites_connected"] == num_sites
    assert report["profile"] == "development"  # a simulation is the development profile, and says so
    sums = {"gram_triu", "cross", "sum_x", "sum_y", "sum_yy", "sum_f", "class_counts", "tokens", "images",
            "sq_dist", "cos_sum", "angle_sum", "sq_norm"}
    for rnd in report["federation"]["rounds"]:
        assert [v["status"] for v in rnd["sites"].values()] == ["ok"] * num_sites, rnd
        for entry in rnd["sites"].values():  # every array the server received is a named sum, never per image
            for key, shape in entry.get("received", {}).items():
                assert key.rsplit("/", 1)[-1].split(":")[-1] in sums, key
                assert all(n in (1, 6, 10, 48, 48 * 49 // 2) for n in shape), (key, shape)
    # the centralised engine on the union of the sites' calibration images
    config = load_federated_config(path)
    model = create_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY))
    dataset = build_dataset(config.data, model)
    p = config.federation.partition
    splits = [simulated_indices(config.data, dataset, np.asarray(dataset.targets), num_sites, site, p.scheme,
                                alpha=p.alpha, shards_per_site=p.shards_per_site, seed=p.seed) for site in range(num_sites)]
    union = np.concatenate([calibration for calibration, _ in splits])
    held = np.concatenate([holdout for _, holdout in splits])
    assert len(np.unique(union)) == len(union)
    plan = parse_plan(report["plan"], 6)
    central = solve_plan(collect_span_stats(ViTAdapter(model), make_loader(Subset(dataset, union.tolist()),
                                                                           config.data), plan.spans), bias=True)
    maps = load_file(str(output / "maps.safetensors"))
    for span in plan.spans:
        for name, expected in (("weight", central[span].map.weight), ("bias", central[span].map.bias)):
            got = maps[f"span.{span.key}.{name}"]
            assert float((got - expected).norm() / expected.norm()) < 1e-9
    assert report["calibration_images"] == len(union)
    # rounds 4-5: the pooled accuracy of federated probe heads equals the centralised probe's
    train, test = (make_loader(Subset(dataset, idx.tolist()), config.data) for idx in (union, held))
    for which, net in (("original", model), ("compressed", load_compressed(output))):
        head = solve_probe(collect_probe_stats(net, train, 10), ridge=1e-6)
        correct, total = accuracy(net, head, test)
        assert report["evaluation"]["pooled"][which] == correct / total and report["evaluation"]["test_images"] == total
    assert json.loads((output / "report.json").read_text())["plan"] == report["plan"]


def test_private_secure_aggregation_run_reproduces_the_server_solve(tmp_path):
    """3 sites, SecAgg+, split seeded noise: the installed maps equal what the server's documented steps give
    from the sites' noisy sums (clip, noise, sum, PSD projection, AdaSSP ridge, public prior), within the
    quantisation error of the secure sum."""
    config = _config(tmp_path, 3, "iid")
    config.update(plan="1->2", budget=None, evaluation={"enabled": False},
                  privacy={"epsilon": 4.0, "aggregation": "secure", "seed": 5, "public_images": 32},
                  federation={**config["federation"], "max_images_per_site": 100})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    report, output = simulate(path)
    privacy = report["privacy"]
    assert privacy["sites_summed"] == 3 and privacy["noise_sites"] == 3 and "seeded" in privacy["noise"]
    assert report["prior"] == "public"
    config = load_federated_config(path)
    model = create_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY))
    adapter = ViTAdapter(model)
    dataset = build_dataset(config.data, model)
    span = parse_plan("1->2", 6).spans[0]
    request = PrivacyRequest(epsilon=4.0, delta=1e-5, releases=("statistics",), aggregation="secure", noise_sites=3,
                             seed=5, clip_spans={k: tuple(v) for k, v in privacy["clip_spans"].items()})
    tokens = adapter.tokens_per_image("all")
    bounds = request.kind_bounds([span], ("linear",))["linear"]
    prior = public_prior_maps(model, public_loader(model, 32), [span], "all", bias=True)
    parts = span_parts([span], bounds)
    p = config.federation.partition
    released = []
    for site in range(3):
        calibration, holdout = simulated_indices(config.data, dataset, np.asarray(dataset.targets), 3, site, p.scheme,
                                                 alpha=p.alpha, shards_per_site=p.shards_per_site, seed=p.seed)
        sums = {split: collect_clipped_span_sums(adapter, make_loader(Subset(dataset, idx.tolist()), config.data), [span],
                                                 token_mode="all", bounds=bounds, priors=prior)
                for split, idx in (("calibration", calibration), ("holdout", holdout))}
        released.append(noisy_spans(sums, parts, privacy["noise_multiplier"] / np.sqrt(3),
                                    noise_source(request, f"site-{site}", "statistics")))
        folder = output.with_name(output.name + "-sites") / f"site-{site}"
        ledger = PrivacyLedger(folder / "privacy-ledger.json")
        assert [e.release for e in ledger.entries()] == ["statistics"]
        # a simulated site keeps its audit log in its simulated folder; the server's is beside its output
        problems, matched = cross_check(check_chain(folder / "audit.jsonl"), check_chain(output.with_name("out.audit.jsonl")))
        assert problems == [] and matched.startswith("1 site heads and 2 site requests matched")
    summed = sum((r["calibration"][span] for r in released[1:]), released[0]["calibration"][span])
    cleaned, ridges = private_inputs({span: summed}, prior, {span: privacy["spans"]["1->2"]["gram_noise_std"]}, tokens,
                                     bias=True)
    assert ridges[span].ridge_lambda == pytest.approx(privacy["spans"]["1->2"]["ridge_lambda"], rel=1e-3)
    expected, _ = solve_span(cleaned[span], bias=True, ridge_lambda=ridges[span].ridge_lambda, prior=prior[span],
                             shrink_bias=True)
    got = load_file(str(output / "maps.safetensors"))["span.1-2.weight"].double()
    assert float((got - expected.weight).norm() / expected.weight.norm()) < 1e-3


def test_a_private_secure_auto_run_releases_both_kinds_once_and_installs_the_chosen_kinds(tmp_path, capsys):
    """`tba-fed simulate` with map: auto, SecAgg+ and seeded split noise, 3 sites: one statistics release per site
    carries both kinds (ledgered at the run's σ, each kind's stds √2 × a one-kind release's), the server logs and
    reports the cost, reports both kinds' noisy held-out errors per span and the kind picked, and every site installs
    the model the server built with those kinds."""
    import math

    config = _config(tmp_path, 3, "iid")
    config.update(plan="1->2, 3->5", budget=None, map="auto", prior="identity", evaluation={"enabled": False},
                  privacy={"epsilon": 8.0, "aggregation": "secure", "seed": 5, "public_images": 32},
                  federation={**config["federation"], "max_images_per_site": 100})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["simulate", str(path)]) == 0
    captured = capsys.readouterr()
    line = "map: auto under privacy: both kinds released, noise std x1.41 per statistic at the same epsilon"
    assert line in captured.out + captured.err
    output = tmp_path / "out"
    report = json.loads((output / "report.json").read_text())
    privacy = report["privacy"]
    assert privacy["map_auto"] == line and privacy["sites_summed"] == 3 and privacy["releases"] == ["statistics"]
    chosen = {}
    for row in report["spans"]:
        errors = row["auto"]["holdout_error"]
        assert set(errors) == {"linear", "folded"}
        assert row["kind"] == row["auto"]["chosen"] == min(errors, key=lambda k: (errors[k], k != "folded"))
        chosen[row["span"]] = row["kind"]
    images = next(iter(make_loader(build_dataset(load_federated_config(path).data, load_compressed(output)),
                                   load_federated_config(path).data)))[0][:4]
    with torch.no_grad():
        server = load_compressed(output)(images)
    for site in range(3):
        folder = output.with_name(output.name + "-sites") / f"site-{site}"
        (entry,) = PrivacyLedger(folder / "privacy-ledger.json").entries()
        assert entry.release == "statistics" and entry.noise_multiplier == pytest.approx(privacy["noise_multiplier"])
        for label, bounds in privacy["clip_spans"].items():  # 2 spans x 2 kinds; the site's share of σ: σ/√3
            assert entry.noise_std[f"{label}:gram"] == pytest.approx(
                privacy["noise_multiplier"] / math.sqrt(3) * bounds[0] / math.sqrt(0.45 / 4))
        assert yaml.safe_load((folder / "compressed" / "manifest.yaml").read_text())["span_maps"] == chosen
        with torch.no_grad():
            assert torch.equal(load_compressed(folder / "compressed")(images), server)


STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"  # tba-fed's one timestamp format
OURS = re.compile(rf"^(?:\(\w+ pid=\d+[^)]*\) )?({STAMP}) (DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+): (.*)$")


def test_the_demo_log_has_one_line_per_event_in_one_format_and_a_refusal_is_one_warning(tmp_path, capsys):
    """`tba-fed simulate` as the demo runs it, 3 sites of which one refuses the statistics by its policy (min_images
    5, and its held-out part has 2 images): every log line once, in one format, no Flower/Ray chatter; the refusal is one
    WARNING line at the site and one named reason in the server's report, no traceback, no Flower exit code 800."""
    config = _config(tmp_path, 3, "dirichlet")
    policy = FederatedRunConfig.model_validate(config).federation.site_policy.model_dump(mode="json")
    config["federation"].update(partition={"scheme": "dirichlet", "alpha": 0.5, "seed": 6}, min_sites=2,
                                site_policy={**policy, "min_images": 5})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["simulate", str(path)]) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    lines = text.splitlines()
    ours = [found for line in lines if (found := OURS.match(strip_escapes(line)))]
    # the log (stderr, and Flower's output relayed to stdout until the result) holds tba-fed's lines only: Flower's
    # CLI's chatter ("Using SuperLink", "Successfully installed") left out, its run id and Ray's warnings rewritten
    log = captured.err.splitlines() + captured.out.split("\n# TBA compression", 1)[0].splitlines()
    assert [line for line in log if line.strip() and not OURS.match(strip_escapes(line))] == [], text[-4000:]
    assert sum("INFO flwr: Successfully started run " in line for line in log) == 1
    # no Flower DEBUG line, no Ray FutureWarning, no shutdown chatter, no traceback
    for noise in ("DEBUG", "FutureWarning", "warnings.warn(", "Manually terminating", "Starting logstream",
                  "Traceback", "traceback left out", "Exit Code", "unhandled exception"):
        assert noise not in text, (noise, text[-4000:])
    # one timestamp format: every timestamp in the log is tba-fed's, at the start of a line of tba-fed's format
    assert not re.search(r"\d\d/\d\d/\d{4}", text), text[-4000:]
    assert len(re.findall(STAMP, text)) == len(ours) > 20
    # one line per event: every message of tba-fed's lines appears in no other line, and the server's lines
    # (no actor prefix) are all different
    for found in ours:
        assert text.count(found[4]) == sum(other[4] == found[4] for other in ours), found[0]
    server = [line for line in lines if OURS.match(line) and not line.startswith("(")]
    assert len(server) == len(set(server))
    for event in ("federation: 3 sites connected", "plan chosen from 3 sites' similarity", "federated run complete"):
        assert sum(found[4].startswith(event) for found in ours) == 1, (event, text[-4000:])
    # the server said how each round went
    assert sum(found[4] == "similarity: 3/3 sites replied" for found in ours) == 1
    # the refusal: one WARNING line at the site, one named reason in the server's report
    refusals = [found for found in ours if "refused a" in found[4]]
    assert [(f[2], f[3], f[4].split(" refused")[0]) for f in refusals] == \
        [("WARNING", "tba_fed.federation.site_audit", "site-0")], text[-4000:]
    assert "privacy.min_images" in refusals[0][4]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    statuses = [(r["name"], site, v["status"]) for r in report["federation"]["rounds"] for site, v in r["sites"].items()
                if v["status"] != "ok"]
    assert statuses == [("statistics", "site-0", "refused")], statuses  # and not asked again
    reason = report["federation"]["rounds"][1]["sites"]["site-0"]["reason"]
    assert reason.startswith("privacy.min_images: ") and "\n" not in reason
