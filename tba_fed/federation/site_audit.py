"""A site's audit trail: every request it serves or refuses, chained in its own audit log.

Each entry says which run asked (run id, sha256 of the run specification), what arrived (sha256 of
the whole request, and of each array record in it: the maps and probe heads), what left (sha256 of the
reply's records, their names and shapes) and under which mechanism (the privacy ledger's entry for the
release, or "exact"). The log is checked before any work, so a site whose log does not verify serves
nothing; the entry is written before the reply leaves, and its hash (the site's new audit head) rides in
the reply's ``meta`` record, where the server records it: the anchor that shows a truncated site log.

This is also where a site's failures leave it, and the server writes what leaves into its report; so only
a `SiteRefusal` (its text comes from the request and the site's configuration alone) leaves with its text.
Any other error may quote what the site's data decided (an image count, a patient's file name): it leaves
as a `SiteError` that names its field alone, and the detail stays in the audit log and in one line of the
site's own log. Either leaves as a failure reply (`failures_as_replies`), not as an exception Flower would
print and forward as a traceback; in the secure round, whose replies Flower's SecAgg+ reads, as an error reply
(`secure_aggregation.refusals_as_errors`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from ..audit import AuditLog
from ..errors import SiteRefusal, TBAInputError
from ..privacy.ledger import PrivacyLedger
from ..privacy.policy import RELEASES, PrivacyRequest, spec_hash
from .envelope import HEAD_KEY
from .failures import failure_reply
from .secure_aggregation import Compute, Scalar
from .records import content_sha256, from_record, received_schema, to_record
from .site import run_spec
from .site_context import SiteContext
from .wire import payload_sha256

_logger = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]
SiteHandler = Callable[[Message, Context, SiteContext], Message]  # a handler given the site resolved for the message
SiteCompute = Callable[[dict[str, Scalar], Context, SiteContext], tuple[Mapping[str, np.ndarray], Mapping[str, float]]]
SECURE_ROUND = "statistics (secure aggregation)"


class SiteError(TBAInputError):
    """What leaves a site in place of any error but a `SiteRefusal`: its field and a fixed text, so the server's
    report holds nothing the site's data decided; the reason stays in the site's audit log and its own log."""

    def __init__(self, site: str, err: Exception) -> None:
        field = err.field if isinstance(err, TBAInputError) else "site"
        super().__init__(field, f"{site} could not serve this request ({type(err).__name__}); the reason is in the "
                                "site's own log", "its operator reads it with tba-fed audit show")


def spec_sha256(config: Mapping[str, Any], release: str) -> str:
    """The ledger's hash of a run specification (`grant_release`); a privacy request that does not parse
    is hashed as received, so a refused request is identified too."""
    spec = run_spec("", {k: v for k, v in config.items() if k != "privacy"}).spec
    privacy = str(config.get("privacy", ""))
    with contextlib.suppress(TBAInputError):
        privacy = PrivacyRequest.from_json(privacy).to_json() if privacy else ""
    return spec_hash(privacy, release, *spec)


def sent_schema(content: RecordDict) -> dict[str, list[int]]:
    """Names and shapes of everything a reply carries: arrays, and scalar values (shape [])."""
    scalars = {f"{name}:{key}": [] for records in (content.config_records, content.metric_records)
               for name, record in records.items() if name != "meta" for key in record}
    return {**received_schema(content), **scalars}


def release_record(ledger: Path | None, run_id: str, release: str) -> dict[str, Any]:
    """The ledger's entry for this run's release (mechanism, σ, noise std per statistic, noise source), or exact."""
    entries = PrivacyLedger(ledger).entries() if ledger is not None else []
    for entry in entries:
        if entry.run_id == run_id and entry.release == release:
            return {k: v for k, v in asdict(entry).items() if k not in ("run_id", "release", "time", "spec_sha256")}
    return {"mechanism": "exact"}


def _served(context: Context, round_name: str, request: Callable[[], dict[str, Any]],
            serve: Callable[[SiteContext], Any], sent: Callable[[Any], RecordDict]) -> tuple[Any, str]:
    """Run `serve` under the audit log, with the site resolved once for the message: refuse if the log does not
    verify, record the outcome either way. A failure leaves the site as itself only if it is a `SiteRefusal`,
    else as a `SiteError`; neither with a chained cause, which a simulation's traceback would show the server.
    What leaves carries the site's name (``site``, None if it could not be read) for its failure reply."""
    site, name = "this site", None
    try:
        site_context = SiteContext(context.node_config, context.run_config)
        audit = site_context.audit  # reads the site's YAML (a simulated site: the run's)
        site = name = site_context.name
        log = AuditLog(audit)
        log.verified()
        event = {"role": "site", "site": name, **request()}
        try:
            result = serve(site_context)
        except Exception as err:
            log.append({**event, "status": "refused" if isinstance(err, TBAInputError) else "error",
                        "error": f"{type(err).__name__}: {err}"})
            raise
        content = sent(result)
        outcome: dict[str, Any] = {"status": "ok", "sent_sha256": content_sha256(content),
                                   "sent": sent_schema(content)}
        if event["release"] in RELEASES:
            outcome["grant"] = release_record(site_context.policy.ledger, event["run_id"], event["release"])
        return result, log.append({**event, **outcome})
    except Exception as err:
        leaving = err if isinstance(err, SiteRefusal) else SiteError(site, err)
        _logger.warning("%s %s a %s request of run %s: %r (the server %s)", site,
                        "refused" if isinstance(err, TBAInputError) else "could not serve", round_name,
                        context.run_id, f"{type(err).__name__}: {err}",
                        "gets this text" if leaving is err else f"gets only its field, {leaving.field}")
        leaving.site = name
        raise leaving from None


def _request(run_id: Any, round_name: str, release: str, message_type: str, config: Mapping[str, Any],
             content: RecordDict) -> dict[str, Any]:
    """What a request was: its run, specification and content hashes, and each array record it carried."""
    received = {}
    for name, record in content.array_records.items():
        arrays = from_record(record)
        received[name] = {"sha256": payload_sha256(arrays), "arrays": {k: list(v.shape) for k, v in arrays.items()}}
    return {"run_id": str(run_id), "round": round_name, "release": release, "message_type": message_type,
            "spec_sha256": spec_sha256(config, release), "request_sha256": content_sha256(content), "received": received}


def audited(release: str, handler: SiteHandler) -> Handler:
    """A ClientApp handler that serves `release` requests with `handler`, every request it serves or refuses
    chained into the site's log, its reply carrying the new head in ``meta``."""
    @functools.wraps(handler)
    def serve(msg: Message, context: Context) -> Message:
        def request() -> dict[str, Any]:
            config = dict(msg.content.config_records.get("config", ConfigRecord()).items())  # none: logged as an error
            return _request(msg.metadata.run_id, release, release, msg.metadata.message_type, config, msg.content)

        reply, head = _served(context, release, request, lambda site: handler(msg, context, site),
                              lambda reply: reply.content)
        reply.content.config_records["meta"][HEAD_KEY] = head
        return reply
    return serve


def failures_as_replies(msg: Message, context: Context, call_next: Handler) -> Message:
    """ClientApp mod of every `audited` handler: what `_served` lets leave the site goes back as a failure reply
    naming the site, which the server reads like any reply; an exception would reach it as a traceback."""
    try:
        return call_next(msg, context)
    except (SiteRefusal, SiteError) as err:
        return failure_reply(msg, err, getattr(err, "site", None))


def audited_secure(compute: SiteCompute) -> Compute:
    """The same record for the secure-aggregation statistics round: the request is the config the site
    received, what it sent is the payload before SecAgg+ masked it (no head travels back: FitRes metrics
    would reach the server unmasked, and the next round's reply anchors this entry anyway)."""
    @functools.wraps(compute)
    def serve(config: dict[str, Scalar], context: Context) -> tuple[Mapping[str, np.ndarray], Mapping[str, float]]:
        result, _ = _served(context, SECURE_ROUND,
                            lambda: _request(context.run_id, SECURE_ROUND, "statistics", "train", config,
                                             RecordDict({"config": ConfigRecord(config)})),
                            lambda site: compute(config, context, site),
                            lambda result: RecordDict({"statistics": to_record(result[0])}))
        return result
    return serve
