"""The privacy audit, part 3: a server that sends malicious requests (issue #12).

Every request here is one a real server could send: it controls the messages, their labels, their
privacy request and which sites take part in a secure sum. Each goes, serialised like on the wire, to
real production sites (their ClientApp, mods and all; initialised state, CSPRNG noise) and must be
refused with the field named, before anything is spent (the ledger is unchanged) or sent (the reply is
an error, or the secure sum fails without the site's masked vector). A request that stays within the
site's terms is served, so each refusal is about the malicious part alone.

On c272bf5 each of these was answered: split noise on a plain query (σ/√3 where σ was claimed), a split
over 10,000 "sites" (1% of the noise), four requests of one run each declaring only its own release
(ε 2.13 spent where 1 was declared), a stored secure payload re-sent into a sum over other sites, a run
calibrated with PRV beyond the site's RDP budget.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from flwr.app import ConfigRecord, Message, RecordDict

from clients.client_app import app
from tba_fed.errors import FederationError
from tba_fed.federation.secure_aggregation import secure_sum
from tba_fed.federation.records import to_record
from tba_fed.federation.wire import encode_heads, encode_maps, encode_priors, private_span_shapes, secure_ranges
from tba_fed.plan import parse_plan
from tba_fed.privacy.accounting import noise_multiplier
from tba_fed.privacy.ledger import PrivacyLedger
from tba_fed.privacy.policy import RELEASES, PrivacyRequest
from tba_fed.privacy.site_state import initialise

import neighbours as nb
from clientapp_grid import ClientAppGrid
from conftest import TINY

pytestmark = pytest.mark.usefixtures("server_identity")
MODEL = {"name": "vit_tiny_patch16_224", "kwargs": TINY}
SPANS = parse_plan(nb.PLAN, 6).spans


def _site(tmp: Path, name: str, seed: int, **policy) -> dict[str, str]:
    """A production hospital, initialised (`tba-fed site init`): 40 images, each held out with probability 0.5
    (a part below min_images = 2 has probability 8e-11); its node config."""
    data = nb.write_source("image_folder", tmp / name / "images", nb.ordinary(40, seed=seed))
    config = {"name": name, "output": str(tmp / name / "out"), "model": MODEL,
              "data": {**data, "batch_size": 8, "holdout_fraction": 0.5},
              "privacy": {"epsilon": 4.0, "min_images": 2, "releases": list(RELEASES),
                          "ledger": str(tmp / name / "ledger.json"), **policy},
              "state": str(tmp / name / "state")}
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config))
    initialise(tmp / name / "state", name, tmp / name / "ledger.json")
    return {"site-config": str(tmp / f"{name}.yaml")}


def _ledger(tmp: Path, name: str) -> list:
    return PrivacyLedger(tmp / name / "ledger.json").entries()


def _request(bounds: nb.Bounds, **terms) -> PrivacyRequest:
    fields = {"epsilon": 1.0, "delta": 1e-5, "releases": RELEASES, "clip_spans": {nb.PLAN: bounds.spans},
              "clip_blocks": bounds.blocks, "clip_features": bounds.features, **terms}
    return PrivacyRequest(**fields)


def _message(kind: str, privacy: PrivacyRequest | str, *, model: dict = MODEL, profile: str = "production",
             map_choice: str = "linear") -> Message:
    """A plain request of `kind` as the server's rounds build it, carrying `privacy` (or that JSON) whatever it says."""
    config = {"model": json.dumps(model), "token-mode": "all", "profile": profile, "plan": nb.PLAN, "map": map_choice,
              "privacy": privacy if isinstance(privacy, str) else privacy.to_json(),
              "prior-maps": encode_priors(nb.identity_maps(48)), "identity-spans": "",
              "num-classes": nb.NUM_CLASSES}
    records = {"config": ConfigRecord(config)}
    if kind in ("probe", "accuracy"):
        records["maps"] = to_record(encode_maps(nb.identity_maps(48)))
    if kind == "accuracy":
        records["heads"] = to_record(encode_heads(nb.heads(48)))
    message_type = "evaluate.accuracy" if kind == "accuracy" else f"query.{kind}"
    return Message(RecordDict(records), dst_node_id=100, message_type=message_type)


def _failure(reply: Message) -> str:
    """The reason of a site's failure reply, which carries nothing else (no arrays, no other records)."""
    assert not reply.has_error() and not reply.content.array_records and not reply.content.metric_records, reply
    assert set(reply.content.config_records) == {"meta", "failure"}, reply
    return str(reply.content.config_records["failure"]["reason"])


def _refused(reply: Message, field: str) -> None:
    """A failure reply naming `field`, carrying nothing else."""
    assert _failure(reply).startswith(f"{field}: "), _failure(reply)


def test_split_noise_on_a_plain_query_is_refused(tmp_path, audit_bounds):
    """A plain reply reaches the server on its own: labelling the request 'secure' must not buy it σ/√m."""
    grid = ClientAppGrid(app, node_configs=[_site(tmp_path, "hospital-a", 1)])
    for kind in ("similarity", "statistics", "probe", "accuracy"):
        reply = grid.answer([_message(kind, _request(audit_bounds, aggregation="secure", noise_sites=3))])[0]
        _refused(reply, "privacy.aggregation")
    assert _ledger(tmp_path, "hospital-a") == []  # nothing spent
    served = grid.answer([_message("statistics", _request(audit_bounds))])[0]  # the same request, full noise: served
    assert not served.has_error() and [e.release for e in _ledger(tmp_path, "hospital-a")] == ["statistics"]


def _secure(grid: ClientAppGrid, nodes: list[int], bounds: nb.Bounds, *, noise_sites: int, threshold: int | None = None):
    request = _request(bounds, aggregation="secure", noise_sites=noise_sites)
    settings = {"model": json.dumps(MODEL), "token-mode": "all", "profile": "production", "plan": nb.PLAN,
                "privacy": request.to_json(), "prior-maps": encode_priors(nb.identity_maps(48)), "max-images": 64}
    return secure_sum(grid, nodes, settings, secure_ranges(request, SPANS, 64), private_span_shapes(SPANS, 48),
                      timeout=10, min_sites=2, reconstruction_threshold=threshold)


@pytest.mark.parametrize(("noise_sites", "threshold", "reason"), [
    (10_000, None, "the site's maximum is 10"),  # 1% of the noise
    (4, None, "only 3 sites take part in this secure sum"),  # more sites than exist
    (3, 2, "SecAgg+ can unmask a sum over as few as 2 (its reconstruction threshold)"),  # a 2-site sum unmaskable
])
def test_a_noise_split_the_secure_round_cannot_back_is_refused(tmp_path, audit_bounds, noise_sites, threshold, reason):
    sites = [_site(tmp_path, f"hospital-{k}", k) for k in range(3)]
    grid = ClientAppGrid(app, node_configs=sites)
    with pytest.raises(FederationError) as err:
        _secure(grid, grid.get_node_ids(), audit_bounds, noise_sites=noise_sites, threshold=threshold)
    assert str(err.value).count("privacy.noise_sites: refused by the site's privacy policy") == 3, str(err.value)
    assert reason in str(err.value)
    assert all(_ledger(tmp_path, f"hospital-{k}") == [] for k in range(3))  # nothing spent
    result = _secure(ClientAppGrid(app, node_configs=sites), grid.get_node_ids(), audit_bounds, noise_sites=3,
                     threshold=3)  # what the sites accept: split over the 3, none unmaskable below 3
    assert result.sites == 3 and all(len(_ledger(tmp_path, f"hospital-{k}")) == 1 for k in range(3))
    applied = _ledger(tmp_path, "hospital-0")[0]
    assert applied.site_noise_multiplier == pytest.approx(applied.noise_multiplier / 3**0.5)  # what was applied


def test_a_secure_payload_is_not_resent_into_a_sum_over_other_sites(tmp_path, audit_bounds):
    """Run 1 sums hospitals 0, 1, 2; the server then asks 0 and 1 again, in the same run, with 3 in place of 2:
    the difference of the two sums would give away 2's sums minus 3's (which the server may know)."""
    sites = [_site(tmp_path, f"hospital-{k}", k) for k in range(4)]
    grid = ClientAppGrid(app, node_configs=sites)
    nodes = grid.get_node_ids()
    assert _secure(grid, nodes[:3], audit_bounds, noise_sites=3, threshold=3).sites == 3
    first = {k: _ledger(tmp_path, f"hospital-{k}") for k in range(2)}
    assert _secure(grid, nodes[:3], audit_bounds, noise_sites=3, threshold=3).sites == 3  # the same sum again: re-sent
    with pytest.raises(FederationError) as err:
        _secure(grid, [nodes[0], nodes[1], nodes[3]], audit_bounds, noise_sites=3, threshold=3)
    assert str(err.value).count("privacy.ledger: run 1 already made its 'statistics' release under another "
                                "specification (a secure release: other SecAgg+ participants)") == 2, str(err.value)
    assert {k: _ledger(tmp_path, f"hospital-{k}") for k in range(2)} == first  # nothing more spent


def test_requests_of_one_run_cannot_each_declare_only_themselves(tmp_path, audit_bounds):
    """Four requests of one run, each declaring only its own release at ε = 1, would spend 2.13 at the site;
    the run's terms are fixed at its first request, so the others are refused."""
    grid = ClientAppGrid(app, node_configs=[_site(tmp_path, "hospital-a", 1)])
    first = grid.answer([_message("similarity", _request(audit_bounds, releases=("similarity",)))])[0]
    assert not first.has_error()
    for kind in ("statistics", "probe", "accuracy"):
        _refused(grid.answer([_message(kind, _request(audit_bounds, releases=(kind,)))])[0], "privacy.releases")
    _refused(grid.answer([_message("similarity", _request(audit_bounds, epsilon=2.0, releases=("similarity",)))])[0],
             "privacy.epsilon")  # nor change its ε
    spent = PrivacyLedger(tmp_path / "hospital-a" / "ledger.json").spent(1e-5)
    assert len(_ledger(tmp_path, "hospital-a")) == 1 and spent == pytest.approx(1.0, rel=0.01)


def test_the_site_composes_its_budget_with_its_own_accountant(tmp_path, audit_bounds):
    """A run calibrated with PRV at the site's whole budget spends 1.08 of it under RDP, which the site uses."""
    grid = ClientAppGrid(app, node_configs=[_site(tmp_path, "hospital-a", 1, epsilon=1.0)])
    reply = grid.answer([_message("statistics", _request(audit_bounds, accountant="prv", releases=("statistics",)))])[0]
    _refused(reply, "privacy.epsilon")
    assert "this run would bring the site to ε=1.0" in _failure(reply) and _ledger(tmp_path, "hospital-a") == []


@pytest.mark.parametrize(("change", "field"), [({"model": {**MODEL, "kwargs": {**TINY, "depth": 4}}}, "model"),
                                               ({"profile": "development"}, "profile")])
def test_a_model_or_profile_change_is_refused(tmp_path, audit_bounds, change, field):
    grid = ClientAppGrid(app, node_configs=[_site(tmp_path, "hospital-a", 1)])
    _refused(grid.answer([_message("statistics", _request(audit_bounds), **change)])[0], field)
    assert _ledger(tmp_path, "hospital-a") == []


def test_seeded_noise_is_refused(tmp_path, audit_bounds):
    grid = ClientAppGrid(app, node_configs=[_site(tmp_path, "hospital-a", 1)])
    _refused(grid.answer([_message("statistics", _request(audit_bounds, seed=3))])[0], "privacy.seed")
    assert _ledger(tmp_path, "hospital-a") == []


def test_an_auto_request_is_served_only_with_both_kinds_bounds_in_policy_and_the_sites_own_even_split(tmp_path,
                                                                                                    audit_bounds):
    """map: auto puts both kinds' sums in one release; the site derives both kinds' parts itself from the bounds
    the request names for each kind, splitting the shares evenly. A request naming one kind's bounds only (the plain
    span's: a one-kind split, the other kind unbounded; or the linear kind's alone), a kind's bound above the site's
    max_clip, an unknown map kind, or shares of its own, is refused before anything is spent; the request within
    the terms is served and ledgered with the stds of the even split (√2 × a one-kind release's)."""
    linear, folded = audit_bounds.spans, audit_bounds.folded_spans
    max_clip = 2 * max(linear + folded)
    grid = ClientAppGrid(app, node_configs=[_site(tmp_path, "hospital-a", 1, max_clip=max_clip)])
    auto = audit_bounds.clip_spans("auto")
    for clip_spans, field, reason in [
            ({nb.PLAN: linear}, "privacy.clip_spans", f"no clipping bounds for linear/{nb.PLAN}, folded/{nb.PLAN}"),
            ({f"linear/{nb.PLAN}": linear}, "privacy.clip_spans", f"no clipping bounds for folded/{nb.PLAN}"),
            ({**auto, f"folded/{nb.PLAN}": (*folded[:4], 1.5 * max_clip)}, "privacy.clip", "exceeds the site's maximum")]:
        reply = grid.answer([_message("statistics", _request(audit_bounds, clip_spans=clip_spans), map_choice="auto")])[0]
        _refused(reply, field)
        assert reason in _failure(reply)
    valid = _request(audit_bounds, clip_spans=auto)
    _refused(grid.answer([_message("statistics", valid, map_choice="both")])[0], "map")
    own_shares = json.dumps({**json.loads(valid.to_json()), "shares": {f"linear/{nb.PLAN}:gram": 0.9}})
    _refused(grid.answer([_message("statistics", own_shares, map_choice="auto")])[0], "privacy.shares")
    assert _ledger(tmp_path, "hospital-a") == []  # nothing spent
    served = grid.answer([_message("statistics", valid, map_choice="auto")])[0]
    assert not served.has_error() and "failure" not in served.content.config_records
    assert {key.split("/")[0] for key in served.content.array_records["statistics"]} == {"linear", "folded"}
    (entry,) = _ledger(tmp_path, "hospital-a")
    sigma = noise_multiplier(1.0, 1e-5, len(RELEASES))
    assert entry.noise_multiplier == pytest.approx(sigma)
    for kind, bounds in (("linear", linear), ("folded", folded)):  # 1 span x 2 kinds: G's 0.45 split two ways
        assert entry.noise_std[f"{kind}/{nb.PLAN}:gram"] == pytest.approx(sigma * bounds[0] / math.sqrt(0.45 / 2))
        assert entry.noise_std[f"{kind}/{nb.PLAN}:gram"] == pytest.approx(
            math.sqrt(2) * sigma * bounds[0] / math.sqrt(0.45))
    assert not any(name.startswith(nb.PLAN) for name in entry.noise_std)  # no one-kind part was released
