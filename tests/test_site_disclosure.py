"""What of a site's failures reaches the server (issue #12, A2b; issue #16, 5): a site that cannot serve a request
answers with a failure reply (its name, the request's echo, a status and one line), and the server writes that
line into its report. Only a `SiteRefusal` (its text depends on the request and the site's configuration alone)
leaves with its text; anything else leaves as its field and a fixed sentence, and the detail (a patient's file
name, a count) stays in the site's audit log and its own log. No exception leaves the ClientApp, so there is no
traceback for Flower (Ray, in a simulation) to print or forward; only the secure round still raises, with no
chained cause.

End to end: real flwr Messages, serialised like on the wire, through the site's real ClientApp
(clients/client_app.py) with a deployed site's YAML (development profile), the SuperNode's error reply,
and the server's own round (`rounds.exchange`), whose site reasons are what the report prints."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from PIL import Image

from clients import client_app
from tba_fed.audit import check_chain
from tba_fed.errors import FederationError, TBAInputError
from tba_fed.federation.rounds import RoundLog, exchange
from tba_fed.federation import site as site_module
from tba_fed.federation.site_audit import SECURE_ROUND, SiteError, audited_secure
from tba_fed.federation.wire import encode_priors
from tba_fed.plan import parse_plan
from tba_fed.privacy.policy import PrivacyRequest
from tba_fed.solver import LinearMap

from clientapp_grid import ClientAppGrid, wire
from conftest import TINY

MODEL = {"name": "vit_tiny_patch16_224", "kwargs": TINY}
PATIENT = "patient-4711-smith.png"
WITHHELD = ("{field}: hospital-a could not serve this request ({kind}); the reason is in the site's own log "
            "(its operator reads it with tba-fed audit show)")


def _site(tmp_path: Path, *, corrupt: bool = False, model: dict | None = None) -> dict[str, str]:
    """A deployed site in the development profile whose folder holds four patients' scans (and, if `corrupt`,
    one file that is not an image); its node config."""
    scans = tmp_path / "images" / "ward-3"
    scans.mkdir(parents=True)
    for k in range(4):
        pixels = np.random.default_rng(k).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(scans / f"patient-47{k:02d}-jones.png")
    if corrupt:
        (scans / PATIENT).write_bytes(b"not a PNG: the scanner cut the transfer")
    config = {"name": "hospital-a", "profile": "development", "output": str(tmp_path / "out"),
              "data": {"source": "image_folder", "path": str(tmp_path / "images"), "batch_size": 8,
                       "holdout_fraction": 0.0},
              "privacy": {"require_dp": False, "min_images": 2, "ledger": str(tmp_path / "ledger.json")},
              **({"model": model} if model is not None else {})}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"site-config": str(path)}


def _statistics(*, model: dict = MODEL, profile: str = "development", epsilon: float | None = None) -> RecordDict:
    config = {"model": json.dumps(model), "token-mode": "all", "plan": "1->2", "profile": profile, "privacy": ""}
    if epsilon is not None:
        request = PrivacyRequest(epsilon=epsilon, delta=1e-5, releases=("statistics",),
                                 clip_spans={"1->2": (1, 1, 1, 1, 1)})
        identity = {parse_plan("1->2", 6).spans[0]: LinearMap(torch.eye(48, dtype=torch.float64), None)}
        config.update(privacy=request.to_json(), **{"prior-maps": encode_priors({"linear": identity})})
    return RecordDict({"config": ConfigRecord(config)})


def _reason(grid: ClientAppGrid, content: RecordDict, status: str = "error") -> str:
    """The server's statistics round against the grid's one site: the reason it records for the site (what the
    report prints), after checking the site is named by its own name (on c272bf5: node-100), no exception left its
    ClientApp, and the run's error message carries the same reason."""
    log = RoundLog("statistics", {})
    with pytest.raises(FederationError) as err:
        exchange(grid, grid.get_node_ids(), "query.statistics", lambda: content, lambda reply: reply, log, timeout=5,
                 min_sites=1)
    [(name, entry)] = log.sites.items()
    assert name == "hospital-a" and entry["status"] == status and entry["reason"] in str(err.value)
    assert grid.raised == {} and not grid.received[0].has_error()
    assert set(grid.received[0].content.config_records) == {"meta", "failure"} and not grid.received[0].content.array_records
    return entry["reason"]


def _site_log_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tba_fed.federation.site_audit"]


def test_an_unreadable_patient_file_reaches_the_server_as_its_field_alone(tmp_path, server_identity, caplog):
    grid = ClientAppGrid(client_app.app, node_configs=[_site(tmp_path, corrupt=True)])
    with caplog.at_level(logging.WARNING, logger="tba_fed"):
        reason = _reason(grid, _statistics())
    assert reason == WITHHELD.format(field="data.path", kind="TBAInputError")
    for secret in ("4711", "smith", "patient", ".png", "ward", "/"):
        assert secret not in reason
    # the detail stays at the site: in its audit log and in one line of its own log
    bad = tmp_path / "images" / "ward-3" / PATIENT
    [entry] = check_chain(tmp_path / "out" / "audit.jsonl").entries
    assert entry["status"] == "refused" and "sent_sha256" not in entry
    assert entry["error"].startswith(f"TBAInputError: data.path: {bad} cannot be read as an image (")
    [line] = _site_log_lines(caplog)
    assert str(bad) in line and "\n" not in line and line.startswith("hospital-a refused a statistics request of run 1: ")


@pytest.mark.parametrize("raised,field,status", [
    (lambda: TBAInputError("data", f"{PATIENT}: 17 of 18 slices unreadable", "rescan"), "data", "refused"),
    (lambda: RuntimeError(f"CUDA out of memory after 17 images ({PATIENT})"), "site", "error"),
])
def test_any_other_error_in_a_handler_leaves_only_its_field_and_no_cause(tmp_path, monkeypatch, server_identity,
                                                                          raised, field, status):
    def fail(*args, **kwargs):
        try:
            raise OSError(f"/srv/scans/{PATIENT}: input/output error")
        except OSError as cause:
            raise raised() from cause
    monkeypatch.setattr(site_module, "statistics_reply", fail)  # what site.answer calls for the ClientApp
    grid = ClientAppGrid(client_app.app, node_configs=[_site(tmp_path)])
    kind = type(raised()).__name__
    assert _reason(grid, _statistics()) == WITHHELD.format(field=field, kind=kind)
    entries = check_chain(tmp_path / "out" / "audit.jsonl").entries
    assert [e["status"] for e in entries] == [status] and entries[0]["error"] == f"{kind}: {raised()}"
    # the reply is all that leaves the ClientApp (in simulation Ray would print and forward an exception's
    # traceback with every chained cause): its records hold the site, the echo, the status and the fixed line
    message = Message(_statistics(), dst_node_id=100, message_type="query.statistics")
    reply = client_app.app(wire(message), grid.contexts[100])
    records = {name: dict(record) for name, record in reply.content.config_records.items()}
    assert records == {"meta": {"site": "hospital-a", "round": "", "run-id": -1},
                       "failure": {"status": "error", "reason": WITHHELD.format(field=field, kind=kind)}}
    assert "4711" not in str(records) and "17" not in str(records)


@pytest.mark.parametrize("kind,site,request_,text", [
    ("tba_fed.errors.SiteRefusal", {}, {"profile": "production"},
     "profile: hospital-a runs in the development profile and refuses a run whose profile is 'production' (run it "
     "with profile: development in the run YAML)"),
    ("tba_fed.errors.SiteRefusal", {"model": MODEL}, {"model": {"name": MODEL["name"], "kwargs": {**TINY, "depth": 4}}},
     "model: hospital-a serves only the model its site YAML declares, and this run asks for another: kwargs "
     f"{json.dumps({**TINY, 'depth': 4}, sort_keys=True)} requested, {json.dumps(TINY, sort_keys=True)} declared (run "
     "it with the sites' model in the run YAML; or, if this site agrees to serve the new model, change model in its "
     "site YAML and run tba-fed preflight)"),
    ("tba_fed.privacy.policy.PolicyRefusal", {}, {"epsilon": 50.0},
     "privacy.epsilon: refused by the site's privacy policy: ε 50 exceeds the site's total budget 1"),
])
def test_a_site_refusal_keeps_its_text(tmp_path, server_identity, kind, site, request_, text):
    grid = ClientAppGrid(client_app.app, node_configs=[_site(tmp_path, **site)])
    reason = _reason(grid, _statistics(**request_), "refused")
    assert reason.startswith(text)
    [entry] = check_chain(tmp_path / "out" / "audit.jsonl").entries
    assert entry["status"] == "refused" and entry["error"].startswith(f"{kind.rsplit('.', 1)[1]}: {text}")
    assert not (tmp_path / "ledger.json").exists()  # refused before anything was spent


def test_the_secure_statistics_round_withholds_the_same_way(tmp_path):
    """The SecAgg+ round's compute runs under the same boundary (`audited_secure`)."""
    def compute(config, context, site):
        raise TBAInputError("data.path", f"/srv/scans/{PATIENT} cannot be read as an image")

    context = Context(run_id=1, node_id=100, node_config=_site(tmp_path), state=RecordDict(), run_config={})
    with pytest.raises(SiteError) as info:
        audited_secure(compute)({"plan": "1->2", "profile": "development"}, context)
    assert str(info.value) == WITHHELD.format(field="data.path", kind="TBAInputError")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    [entry] = check_chain(tmp_path / "out" / "audit.jsonl").entries
    assert entry["round"] == SECURE_ROUND and entry["status"] == "refused" and PATIENT in entry["error"]
