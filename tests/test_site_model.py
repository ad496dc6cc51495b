"""A site serves only the model its YAML declares, and checks the run's profile and model before it loads
any weight, reads any image or spends any budget: the real ClientApp handlers on a tiny ViT, the refusal
in the site's audit log, nothing in its ledger or output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from safetensors.torch import save_file

from tba_fed import ModelConfig, TBAInputError, create_model
from tba_fed.audit import check_chain
from tba_fed.federation import site as site_module
from tba_fed.federation.site_context import SiteContext
from tba_fed.federation.records import from_record
from tba_fed.federation.site_admission import model_differences
from tba_fed.federation.wire import encode_priors
from tba_fed.fileio import file_sha256
from tba_fed.plan import parse_plan
from tba_fed.privacy.ledger import PrivacyLedger
from tba_fed.privacy.policy import PrivacyRequest
from tba_fed.privacy.site_state import initialise
from tba_fed.solver import LinearMap

from conftest import TINY

NAME = "vit_tiny_patch16_224"
FIX = ("run it with the sites' model in the run YAML; or, if this site agrees to serve the new model, change model in "
       "its site YAML and run tba-fed preflight")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, str]:
    """A tiny ViT's weights as a file, and their sha256."""
    path = tmp_path_factory.mktemp("weights") / "vit.safetensors"
    model = create_model(ModelConfig(name=NAME, kwargs=TINY))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, file_sha256(path)


def _pinned(weights: tuple[Path, str], **changes) -> dict:
    path, digest = weights
    return {"name": NAME, "kwargs": TINY, "checkpoint": str(path), "sha256": digest, **changes}


def _context(tmp_path: Path, model: dict | None, data: dict | None = None, state: Path | None = None) -> Context:
    """A production site whose audit log lives outside its output folder (so the folder stays absent unless
    something is written there); its state (split key, ledger) is initialised in tmp_path unless `state` names
    one initialised before. Each image is held out with probability 0.5: a part of fewer than min_images = 2 of
    the 32 images has probability 1.5e-8."""
    state = state or tmp_path
    config = {"name": "hospital-a", "output": str(tmp_path / "out"), "audit": str(tmp_path / "audit.jsonl"),
              "data": data or {"source": "synthetic", "num_images": 32, "batch_size": 8, "holdout_fraction": 0.5},
              "privacy": {"require_dp": False, "epsilon": 8.0, "min_images": 2, "ledger": str(state / "ledger.json")},
              "state": str(state / "state"), **({"model": model} if model is not None else {})}
    path = tmp_path / "site.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    if state == tmp_path:
        initialise(state / "state", "hospital-a", state / "ledger.json")  # tba-fed site init: an empty ledger
    return Context(run_id=77, node_id=5, node_config={"site-config": str(path)}, state=RecordDict(), run_config={})


def _statistics(model: dict, *, profile: str = "production", private: bool = False) -> Message:
    config = {"model": json.dumps(model), "token-mode": "all", "plan": "1->2", "profile": profile, "privacy": ""}
    if private:
        request = PrivacyRequest(epsilon=4.0, delta=1e-5, releases=("statistics",), clip_spans={"1->2": (1, 1, 1, 1, 1)})
        identity = {parse_plan("1->2", 6).spans[0]: LinearMap(torch.eye(48, dtype=torch.float64), None)}
        config.update(privacy=request.to_json(), **{"prior-maps": encode_priors({"linear": identity})})
    return Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=5, message_type="query.statistics")


def _no_weights(monkeypatch) -> None:
    """Any attempt to build the site's model fails the test (the cache is emptied so nothing is served from it)."""
    def refuse(config: ModelConfig):
        raise AssertionError(f"a model was built: {config}")
    site_module.cached_model.cache_clear()
    monkeypatch.setattr(site_module, "create_model", refuse)


UNREADABLE = {"source": "image_folder", "path": "/nonexistent/hospital-a/images"}  # reading it would fail as data.path


@pytest.mark.parametrize("site,request_changes,difference", [
    ({"name": NAME, "kwargs": TINY}, {"name": "deit_tiny_patch16_224"},
     'name "deit_tiny_patch16_224" requested, "vit_tiny_patch16_224" declared'),
    ({"name": NAME, "kwargs": TINY}, {"kwargs": {**TINY, "depth": 4}},
     f'kwargs {json.dumps({**TINY, "depth": 4}, sort_keys=True)} requested, {json.dumps(TINY, sort_keys=True)} declared'),
    ("pinned", {"sha256": "0" * 64}, 'sha256 "ZEROS" requested, "DIGEST" declared'),
    ("pinned", {"sha256": None}, 'sha256 null requested, "DIGEST" declared'),  # the server cannot drop the pin
])
def test_a_site_refuses_another_model_before_loading_weights_reading_images_or_spending(
        tmp_path, monkeypatch, server_identity, checkpoint, site, request_changes, difference):
    from clients.client_app import statistics

    declared = _pinned(checkpoint) if site == "pinned" else site
    context = _context(tmp_path, declared, UNREADABLE)
    _no_weights(monkeypatch)
    with pytest.raises(TBAInputError) as err:
        statistics(_statistics({**declared, **request_changes}, private=True), context)
    difference = difference.replace("ZEROS", "0" * 64).replace("DIGEST", checkpoint[1])
    assert str(err.value) == (f"model: hospital-a serves only the model its site YAML declares, and this run asks for "
                              f"another: {difference} ({FIX})")
    assert err.value.field == "model" and err.value.fix == FIX
    # nothing spent, nothing written
    assert PrivacyLedger(tmp_path / "ledger.json").entries() == [] and not (tmp_path / "out").exists()
    [entry] = check_chain(tmp_path / "audit.jsonl").entries
    assert entry["status"] == "refused" and entry["error"] == f"SiteRefusal: {err.value}"  # its text may leave the site
    assert entry["round"] == "statistics" and "sent_sha256" not in entry


def test_a_matching_request_is_served_with_the_sites_own_model_and_the_same_statistics(tmp_path, server_identity,
                                                                                      checkpoint):
    """Pinned, the checkpoint's path is each machine's own and seed does not matter (every weight comes from the
    file): a request naming another path and seed is served with the site's file, and its sums are those a site
    without a model section computes for the request that names that file."""
    from clients.client_app import statistics

    before = statistics(_statistics(_pinned(checkpoint)), _context(tmp_path / "without", None))
    elsewhere = _pinned(checkpoint, checkpoint=str(tmp_path / "server" / "vit.safetensors"), seed=7)  # not on this site
    after = statistics(_statistics(elsewhere), _context(tmp_path / "with", _pinned(checkpoint),  # the same site's state
                                                        state=tmp_path / "without"))
    sums, expected = (from_record(reply.content.array_records["statistics"]) for reply in (after, before))
    assert sums.keys() == expected.keys() and len(sums) == 14
    for key, value in expected.items():
        np.testing.assert_array_equal(sums[key], value)
    assert sums["calibration/1-2/images"][0] + sums["holdout/1-2/images"][0] == 32  # every image, used or held out
    assert [e["status"] for e in check_chain(tmp_path / "with" / "audit.jsonl").entries] == ["ok"]


def test_the_profile_is_checked_before_any_model_is_built(tmp_path, monkeypatch, server_identity):
    from clients.client_app import statistics

    context = _context(tmp_path, {"name": NAME, "kwargs": TINY}, UNREADABLE)
    _no_weights(monkeypatch)
    other = {"name": NAME, "kwargs": {**TINY, "depth": 4}}
    for model in ({"name": NAME, "kwargs": TINY}, other):  # the profile first, whatever the model
        with pytest.raises(TBAInputError) as err:
            statistics(_statistics(model, profile="development", private=True), context)
        assert str(err.value) == ("profile: hospital-a runs in the production profile and refuses a run whose profile is "
                                  "'development' (run it with profile: production in the run YAML)")
    assert [e["status"] for e in check_chain(tmp_path / "audit.jsonl").entries] == ["refused", "refused"]
    assert PrivacyLedger(tmp_path / "ledger.json").entries() == [] and not (tmp_path / "out").exists()
    simulated = Context(run_id=77, node_id=5, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                        run_config={"config-path": str(tmp_path / "unused.yaml")})
    with pytest.raises(TBAInputError, match="^profile: site-0 runs in the development profile and refuses a run whose "
                                            "profile is 'production'"):
        site_module.site_model(SiteContext(simulated.node_config, simulated.run_config),
                               {"model": json.dumps(other), "profile": "production"})


def test_which_fields_change_the_computation(checkpoint):
    """Seed matters only where weights are drawn from it; the path only when the checkpoint is not pinned."""
    random = ModelConfig(name=NAME, kwargs=TINY)
    assert model_differences(random, random.model_copy(update={"seed": 1})) == ["seed 1 requested, 0 declared"]
    assert model_differences(random, random.model_copy(update={"kwargs": {**TINY, "img_size": 32.0}})) == [
        f'kwargs {json.dumps({**TINY, "img_size": 32.0}, sort_keys=True)} requested, '
        f'{json.dumps(TINY, sort_keys=True)} declared']
    assert model_differences(random, random.model_copy(update={"pretrained": True})) == [
        "pretrained true requested, false declared"]
    pinned = ModelConfig.model_validate(_pinned(checkpoint))
    assert model_differences(pinned, pinned.model_copy(update={"seed": 3, "checkpoint": Path("/elsewhere.st")})) == []
    unpinned = pinned.model_copy(update={"sha256": None})
    assert model_differences(unpinned, unpinned.model_copy(update={"checkpoint": Path("/elsewhere.st")})) == [
        f'checkpoint "/elsewhere.st" requested, "{checkpoint[0]}" declared']
    assert model_differences(unpinned, pinned) == [f'sha256 "{checkpoint[1]}" requested, null declared']
    assert model_differences(random, pinned) == [f'checkpoint "{checkpoint[0]}" requested, null declared',
                                                 f'sha256 "{checkpoint[1]}" requested, null declared']
    offline = ModelConfig(name="dinov2-s-imgfocus", kwargs={"img_size": 112})
    assert model_differences(offline, offline.model_copy(update={"seed": 5})) == []
    assert model_differences(offline, offline.model_copy(update={"kwargs": {"img_size": 224}})) == [
        'kwargs {"img_size": 224} requested, {"img_size": 112} declared']
