"""The server's side: ask sites for sums, validate and add them, solve, install, report.

Rounds: (1) similarity, only when a budget must choose the plan; (2) span statistics; (3) install
(maps + plan out, checksums back). Every reply is validated before it is summed; a site that errors,
times out or sends a bad reply is excluded and named in the report. A round with fewer than
``min_sites`` valid replies stops the run with a message naming every site and its reason.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..adapter import ViTAdapter
from ..checkpoint import manifest, maps_checksum, write_compressed
from ..compressed import build_compressed, parameter_report
from ..errors import FederationError, TBAInputError, one_line
from ..fileio import check_output_dir
from ..models import create_model
from ..pipeline import Compression, choose_plan, solve_plan
from ..plan import Span
from ..privacy.accounting import noise_multiplier
from ..privacy.clipped import to_span_stats
from ..privacy.policy import PrivacyRequest
from ..privacy.postprocess import adassp_ridge, psd_projection
from ..privacy.mechanism import NoiseSource
from ..privacy.public_prior import public_norms, public_prior_maps, public_span_bounds
from ..privacy.release import noisy_spans
from ..privacy.sensitivity import probe_parts, span_parts
from ..privacy.solve import compare_priors, private_inputs
from ..probe import solve_probe
from ..public_images import public_loader
from ..report import compression_dict, compression_markdown, write_similarity
from ..solver import LinearMap
from ..stats import SpanStats
from .config import FederatedRunConfig, fixed_plan
from .delivery import BoundedGrid, replies_as_they_arrive
from .envelope import check_echo, stamp
from .failures import decode_failure, error_reason
from .private_rounds import privacy_markdown, privacy_summary, secure_statistics_round
from .records import from_record, received_schema, to_record
from .server_audit import ServerAudit, reply_receipt
from .wire import (MODELS, decode_private_spans, decode_probe, decode_similarity, decode_spans, encode_heads,
                   encode_maps, encode_priors, payload_bytes)

_logger = logging.getLogger(__name__)


NOISE_DRAWS = 20  # re-noisings of the held-out release that give the report's ± on each estimate


@dataclass
class RoundLog:
    """One round's outcome per site; `nodes` are the sites whose replies were valid (asked next round);
    `names` maps node ids to the names sites gave, shared by all rounds of a run."""

    name: str
    names: dict[int, str]
    seconds: float = 0.0
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: list[int] = field(default_factory=list)


def record_bytes(content: RecordDict) -> int:
    """Array payload of a message (what the statistics cost on the wire, before framing)."""
    return sum(payload_bytes(from_record(record)) for record in content.array_records.values())


def _site_name(node_id: int, reply: Message | None, names: dict[int, str]) -> str:
    """A site's own name once it has sent one (remembered in `names` for later rounds), else its node id."""
    if reply is not None and not reply.has_error() and "meta" in reply.content.config_records:
        claimed = str(reply.content.config_records["meta"].get("site", node_id))
        if claimed not in (name for other, name in names.items() if other != node_id):  # a taken name is refused
            names[node_id] = claimed
    return names.get(node_id, f"node-{node_id}")


def exchange(grid: Grid, nodes: list[int], message_type: str, make_content: Callable[[], RecordDict],
             decode: Callable[[RecordDict], Any], log: RoundLog, *, timeout: float, min_sites: int,
             images: Callable[[Any], int] | None = None, audit: ServerAudit | None = None) -> dict[str, Any]:
    """Send one message per node, validate each reply with `decode` as it arrives, keep the valid ones.

    Replies are judged one at a time and dropped, so `decode` may fold a reply into a running total and
    the server holds one site's reply at a time. `images` reads the image count a valid reply summarises,
    for the report; `audit` records the round.
    """
    start = time.perf_counter()
    contents = {node: make_content() for node in nodes}
    sent = {node: Message(content=contents[node], dst_node_id=node, message_type=message_type) for node in nodes}
    for msg in sent.values():
        stamp(msg, log.name)
    accepted: dict[str, Any] = {}
    entries: dict[int, dict[str, Any]] = {}
    receipts: dict[int, dict[str, Any]] = {}
    for node, replies in replies_as_they_arrive(grid, list(sent.values()), timeout=timeout):
        reply = replies[0] if len(replies) == 1 else None
        name = _site_name(node, replies[-1] if replies else None, log.names)
        entry: dict[str, Any] = {"node_id": node}
        if len(replies) > 1:
            entry.update(status="rejected", reason=f"duplicate reply: {len(replies)} replies to one request, all discarded")
        elif reply is None:
            entry.update(status="not delivered", reason="the SuperLink did not accept the request")
        elif reply.has_error():
            entry.update(status="error", reason=error_reason(reply.error))
        else:
            if audit is not None:
                receipts[node] = reply_receipt(reply)
            try:
                check_echo(reply.content, sent[node], name)
                failure = decode_failure(reply.content)
                if failure is not None:  # the site could not serve the request, and says why in one line
                    entry.update(status=failure[0], reason=failure[1])
                else:
                    accepted[name] = decode(reply.content)
                    entry.update(status="ok", bytes_received=record_bytes(reply.content),
                                 received=received_schema(reply.content))
                    if images is not None:
                        entry["images"] = images(accepted[name])
            except (TBAInputError, KeyError, ValueError) as err:
                entry.update(status="rejected", reason=one_line(str(err)))
        entries[node] = entry
        del replies, reply  # one site's reply held at a time
    for node in nodes:  # the report lists sites in node order, whatever order their replies came in
        entry = entries.get(node) or {"node_id": node, "status": "no reply", "reason": f"no reply within {timeout:.0f} s"}
        name = _site_name(node, None, log.names)
        if entry["status"] != "ok":
            _logger.warning("round %s: excluded %s: %s", log.name, name, entry["reason"])
        log.sites[name] = {"node_id": node, "bytes_sent": record_bytes(contents[node]),
                           **{k: v for k, v in entry.items() if k != "node_id"}}
    log.seconds = time.perf_counter() - start
    log.nodes = [log.sites[name]["node_id"] for name in log.sites if log.sites[name]["status"] == "ok"]
    if audit is not None:
        audit.round(log, message_type, contents, receipts)
    if len(accepted) < min_sites:
        detail = "; ".join(f"{one_line(s, 100)}: {v['status']}" + (f" ({v['reason']})" if v.get("reason") else "")
                           for s, v in log.sites.items())
        raise FederationError(f"round {log.name}: {len(accepted)} valid replies, min_sites is {min_sites}. {detail}")
    return accepted


def wait_for_nodes(grid: Grid, wanted: int, minimum: int, timeout: float) -> list[int]:
    """Wait until `wanted` sites are connected, or settle for `minimum` when the timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or (time.monotonic() > deadline and len(nodes) >= minimum):
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} sites connected within {timeout:.0f} s; min_sites is {minimum}")
        time.sleep(1.0)


def _check_images(stats_images: int, minimum: int, field: str) -> None:
    if stats_images < minimum:
        raise TBAInputError(field, f"summarises {stats_images} images, the minimum per site is {minimum}")


def run_server(grid: Grid, config: FederatedRunConfig, superlink_checks: list[str] | None = None) -> dict[str, Any]:
    """The whole federated run; returns the report that is also written to ``config.output``.
    `superlink_checks`: what the production ServerApp verified of the SuperLink before round 1 (reported)."""
    fed = config.federation
    check_output_dir(config.output, kind="compressed", overwrite=config.overwrite)  # fail before any site works, not after
    grid = BoundedGrid(grid, patience=fed.round_timeout)  # no call waits forever for a SuperLink that is gone
    model = create_model(config.model)
    adapter = ViTAdapter(model)
    plan, identity = fixed_plan(config, adapter.num_blocks)
    audit = ServerAudit(config.audit_log, str(grid.run.run_id))
    tokens = adapter.tokens_per_image(config.token_mode)
    model_json = config.model.model_dump_json()
    nodes = wait_for_nodes(grid, fed.num_sites, fed.min_sites, fed.round_timeout)
    connected = len(nodes)
    names: dict[int, str] = {}
    _logger.info("federation: %d sites connected", connected)
    rounds: list[RoundLog] = []
    similarity = None

    def content(**values: Any) -> Callable[[], RecordDict]:
        settings = {"model": model_json, "token-mode": config.token_mode, "profile": config.profile, **values}
        return lambda: RecordDict({"config": ConfigRecord(settings)})

    privacy = config.privacy
    prior_kind = config.prior or ("public" if privacy is not None else "zero")
    public = public_loader(model, privacy.public_images if privacy else 336) if privacy or prior_kind == "public" else None
    releases = (() if config.plan is not None else ("similarity",)) + ("statistics",) + \
        (("probe", "accuracy") if config.evaluation.enabled else ())
    # block and feature norms bound only the similarity and probe releases: a full forward pass, so only when asked
    norms = public_norms(model, public, config.token_mode) \
        if privacy is not None and {"similarity", "probe"} & set(releases) else None
    sigma = noise_multiplier(privacy.epsilon, privacy.delta, len(releases), privacy.accountant) if privacy else None

    def request(secure: bool = False, **clip: Any) -> PrivacyRequest | None:
        """The privacy part of a round's specification (None: exact sums). Only the statistics round goes
        through secure aggregation; every other release carries the full noise at each site."""
        if privacy is None:
            return None
        return PrivacyRequest(epsilon=privacy.epsilon, delta=privacy.delta, accountant=privacy.accountant,
                              releases=releases, aggregation="secure" if secure else "local",
                              noise_sites=fed.min_sites if secure else 1, seed=privacy.seed, **clip)

    def private(req: PrivacyRequest | None) -> dict[str, str]:
        return {"privacy": req.to_json() if req is not None else ""}
    if plan is None:  # a budget: the sites' summed similarity chooses the plan
        log = RoundLog("similarity", names)
        rounds.append(log)

        similarity_request = request(clip_blocks=norms.block_bounds(privacy.clip_scale)) if privacy else None

        def decode_similarity_reply(reply: RecordDict):
            stats = decode_similarity(from_record(reply.array_records["similarity"]), adapter.num_blocks)
            _check_images(stats.images, fed.min_images_per_site, "similarity.images")
            return stats

        replies = exchange(grid, nodes, f"{MessageType.QUERY}.similarity", content(**private(similarity_request)),
                           decode_similarity_reply, log,
                           timeout=fed.round_timeout, min_sites=fed.min_sites, images=lambda stats: stats.images,
                           audit=audit)
        nodes = log.nodes
        similarity = sum(replies.values())
        plan = choose_plan(model, similarity, blocks=config.budget.blocks, params=config.budget.params,
                           metric=config.budget.metric, bias=config.bias)
        _logger.info("plan chosen from %d sites' similarity: %s", len(replies), plan)

    public_maps = public_prior_maps(model, public, plan.spans, config.token_mode, config.bias) if public else {}
    dim = adapter.embed_dim
    priors = ({s: LinearMap(torch.eye(dim, dtype=torch.float64), None) for s in plan.spans} if prior_kind == "identity"
              else public_maps if prior_kind == "public"
              else {s: LinearMap(torch.zeros(dim, dim, dtype=torch.float64), None) for s in plan.spans})
    statistics_request = bounds = None
    if privacy is not None:
        held_out_crops = public_loader(model, privacy.public_images, seed=1)  # residual bounds not fitted on
        bounds = public_span_bounds(model, held_out_crops, plan.spans, priors, config.token_mode, privacy.clip_scale)
        statistics_request = request(privacy.aggregation == "secure",
                                     clip_spans={str(s): b.as_tuple() for s, b in bounds.items()})
    settings = {"plan": str(plan), **private(statistics_request),
                **({"prior-maps": encode_priors(priors)} if privacy is not None else {})}
    if privacy is not None and privacy.aggregation == "secure":
        log = RoundLog("statistics (secure aggregation)", names)
        rounds.append(log)
        released, summed = secure_statistics_round(grid, nodes, config, statistics_request, plan, dim,
                                                   content(**settings)(), log, audit)
    else:
        log = RoundLog("statistics", names)
        rounds.append(log)

        released: dict[str, dict[Span, Any]] = {}

        def decode_statistics_reply(reply: RecordDict) -> int:
            """Validate one site's sums and add them to the total at once: the server holds one site's
            statistics at a time, however many sites reply. Returns the images they summarise."""
            arrays = from_record(reply.array_records["statistics"])
            if privacy is not None:
                stats = decode_private_spans(arrays, plan.spans, dim)
                count = int(round(float(stats["calibration"][plan.spans[0]].weight)))
            else:
                stats = decode_spans(arrays, plan.spans, dim, psd_tolerance=fed.psd_tolerance)
                count = stats["calibration"][plan.spans[0]].images
                _check_images(count, fed.min_images_per_site, "statistics.images")
            for split, per_span in stats.items():
                released[split] = {s: released[split][s] + v for s, v in per_span.items()} if split in released \
                    else per_span
            return count

        replies = exchange(grid, nodes, f"{MessageType.QUERY}.statistics", content(**settings),
                           decode_statistics_reply, log, timeout=fed.round_timeout, min_sites=fed.min_sites,
                           images=lambda count: count, audit=audit)
        nodes = log.nodes
        summed = len(replies)
    merged = released if privacy is None else {  # held-out sums as released; calibration sums are cleaned below
        split: {s: to_span_stats(sums, priors[s], tokens) for s, sums in per_span.items()}
        for split, per_span in released.items()}
    calibration, ridge_lambdas, privacy_report = merged["calibration"], None, None
    if privacy is not None:
        parts = {p.name: p for p in span_parts(plan.spans, bounds)}
        spread = math.sqrt(summed / statistics_request.noise_sites)  # total noise over σ per release
        gram_std = {s: parts[f"{s}:gram"].std(sigma) * spread for s in plan.spans}
        calibration, ridges = private_inputs(released["calibration"], priors, gram_std, tokens, bias=config.bias)
        ridge_lambdas = {s: r.ridge_lambda for s, r in ridges.items()}
        privacy_report = privacy_summary(privacy, statistics_request, sigma, summed, ridges, gram_std)
    fits = solve_plan(calibration, merged["holdout"], bias=config.bias, ridge=config.ridge,
                      identity=frozenset(identity), priors=priors, ridge_lambdas=ridge_lambdas,
                      shrink_bias=privacy is not None)
    maps = {span: fit.map for span, fit in fits.items()}
    result = Compression(
        model=build_compressed(model, maps), plan=plan, fits=fits,
        parameters=parameter_report(model, plan, bias=config.bias, identity=frozenset(identity)),
        token_mode=config.token_mode, bias=config.bias, ridge=config.ridge,
        calibration_images=merged["calibration"][plan.spans[0]].images,
        holdout_images=merged["holdout"][plan.spans[0]].images, source=config.model,
    )
    report = compression_dict(result)
    report["profile"] = config.profile  # sites check it against their own before serving
    if superlink_checks:
        report["superlink_checks"] = superlink_checks
    report["prior"] = prior_kind
    if privacy_report is not None:
        report["privacy"] = privacy_report
    if (privacy is not None or public_maps) and merged["holdout"][plan.spans[0]].tokens > 0:
        draws: dict[Span, list[SpanStats]] = {s: [] for s in plan.spans}
        if privacy is not None:  # re-noise the released held-out sums as they were released: the estimates' spread
            holdout_parts = span_parts(plan.spans, bounds)
            for k in range(NOISE_DRAWS):
                renoised = noisy_spans({"holdout": released["holdout"]}, holdout_parts, sigma * spread,
                                       NoiseSource(k))["holdout"]
                for s in plan.spans:
                    draws[s].append(to_span_stats(renoised[s], priors[s], tokens))
        comparison = {s: compare_priors(calibration[s], merged["holdout"][s], bias=config.bias, ridge=config.ridge,
                                        shrink_bias=privacy is not None,
                                        ridge_lambda=None if ridge_lambdas is None else ridge_lambdas[s],
                                        public=public_maps.get(s), holdout_draws=draws[s])
                      for s in plan.spans if s not in identity}
        report["prior_comparison"] = {str(s): c[0] for s, c in comparison.items()}
        if privacy is not None:
            report["prior_comparison_std"] = {str(s): c[1] for s, c in comparison.items()}

    log = RoundLog("install", names)
    rounds.append(log)
    expected = maps_checksum(maps)

    def install_content() -> RecordDict:
        return RecordDict({"maps": to_record(encode_maps(maps)),
                           "config": ConfigRecord({"model": model_json, "profile": config.profile, "plan": str(plan),
                                                   "report": json.dumps(report),
                                                   "identity-spans": ", ".join(str(s) for s in identity)})})

    def decode_install_reply(reply: RecordDict):
        digest = str(reply.config_records["install"]["checksum"])
        if digest != expected:
            raise TBAInputError("install.checksum", f"site installed maps with sha256 {digest[:12]}…, "
                                                    f"the server sent {expected[:12]}…")
        return digest

    exchange(grid, nodes, f"{MessageType.TRAIN}.install", install_content, decode_install_reply, log,
             timeout=fed.round_timeout, min_sites=fed.min_sites, audit=audit)
    nodes = log.nodes
    if config.evaluation.enabled:
        probe_request = request(clip_features=norms.feature_bound(privacy.clip_scale)) if privacy else None
        report["evaluation"] = evaluate_rounds(grid, nodes, config, model_json, plan, identity, maps,
                                               int(model.num_features), rounds, probe_request, sigma, audit)
    report["federation"] = {
        "sites_connected": connected,
        "maps_sha256": expected,
        "rounds": [{"name": r.name, "seconds": round(r.seconds, 3), "sites": r.sites} for r in rounds],
    }
    report_json = json.dumps(report, indent=2) + "\n"
    write_compressed(config.output, maps, manifest(report, maps), overwrite=config.overwrite,
                     files={"report.json": report_json,
                            "report.md": compression_markdown(report) + privacy_markdown(report)
                                         + (evaluation_markdown(report["evaluation"])
                                                                         if "evaluation" in report else "")
                                         + federation_markdown(report["federation"], config.profile,
                                                               superlink_checks)},
                     extra=None if similarity is None else (lambda folder: write_similarity(folder, similarity)))
    audit.result(expected, config.output, report_json)
    _logger.info("federated run complete: %s written", config.output)
    return report


def evaluate_rounds(grid: Grid, nodes: list[int], config: FederatedRunConfig, model_json: str, plan, identity,
                    maps, dim: int, rounds: list[RoundLog], request: PrivacyRequest | None = None,
                    sigma: float | None = None, audit: ServerAudit | None = None) -> dict[str, Any]:
    """Rounds 4-5: probe sums from every site, heads solved here, correct counts back (noisy under DP)."""
    fed, ev = config.federation, config.evaluation
    names = rounds[0].names
    settings = {"model": model_json, "profile": config.profile, "plan": str(plan),
                "identity-spans": ", ".join(str(s) for s in identity),
                "num-classes": ev.num_classes, "privacy": request.to_json() if request is not None else ""}
    log = RoundLog("probe", names)
    rounds.append(log)

    def decode_probe_reply(reply: RecordDict):
        stats = decode_probe(from_record(reply.array_records["probe"]), dim, ev.num_classes,
                             psd_tolerance=None if request is not None else fed.psd_tolerance)
        _check_images(stats["original"].images, fed.min_images_per_site, "probe.images")
        return stats

    replies = exchange(grid, nodes, f"{MessageType.QUERY}.probe",
                       lambda: RecordDict({"maps": to_record(encode_maps(maps)), "config": ConfigRecord(settings)}),
                       decode_probe_reply, log, timeout=fed.round_timeout, min_sites=fed.min_sites,
                       images=lambda stats: stats["original"].images, audit=audit)
    nodes = log.nodes
    pooled_stats = {which: sum(r[which] for r in replies.values()) for which in MODELS}
    if request is not None:
        pooled_stats = {which: private_probe_stats(stats, request, sigma, len(replies)) for which, stats in pooled_stats.items()}
    heads = {which: solve_probe(stats, ridge=ev.probe_ridge) for which, stats in pooled_stats.items()}
    log = RoundLog("accuracy", names)
    rounds.append(log)

    def decode_accuracy_reply(reply: RecordDict) -> dict[str, int]:
        counts = {k: reply.metric_records["accuracy"][k] for k in ("original_correct", "compressed_correct", "total")}
        if any(not isinstance(v, int) or v < 0 for v in counts.values()) or \
                max(counts["original_correct"], counts["compressed_correct"]) > counts["total"]:
            raise TBAInputError("accuracy", f"counts must be integers with 0 <= correct <= total, got {counts}")
        return counts

    counts = exchange(grid, nodes, f"{MessageType.EVALUATE}.accuracy",
                      lambda: RecordDict({"maps": to_record(encode_maps(maps)), "heads": to_record(encode_heads(heads)),
                                          "config": ConfigRecord(settings)}),
                      decode_accuracy_reply, log, timeout=fed.round_timeout, min_sites=fed.min_sites,
                      images=lambda c: c["total"], audit=audit)
    total = sum(c["total"] for c in counts.values())
    pooled = {which: sum(c[f"{which}_correct"] for c in counts.values()) / max(total, 1) for which in MODELS}
    per_site = {site: {"images": c["total"], "original": c["original_correct"] / max(c["total"], 1),
                       "compressed": c["compressed_correct"] / max(c["total"], 1)} for site, c in sorted(counts.items())}
    _logger.info("accuracy (pooled over %d held-out images): original %.4f, compressed %.4f", total,
                 pooled["original"], pooled["compressed"])
    return {"probe": "closed-form ridge probe on the final-norm class token", "probe_ridge": ev.probe_ridge,
            "probe_images": int(sum(r["original"].images for r in replies.values())), "test_images": total,
            "pooled": pooled, "sites": per_site}


def private_probe_stats(stats, request: PrivacyRequest, sigma: float, sites: int):
    """Noisy probe sums made solvable: Gram projected onto the PSD cone plus the AdaSSP ridge on its diagonal."""
    std = {p.name: p for p in probe_parts(MODELS, request.clip_features)}["original:gram"].std(sigma) * math.sqrt(sites)
    choice = adassp_ridge(stats.gram, std)
    gram = psd_projection(stats.gram)
    gram.diagonal().add_(choice.ridge_lambda)
    return replace(stats, gram=gram)


def evaluation_markdown(evaluation: dict[str, Any]) -> str:
    lines = ["", "## Accuracy", "", f"{evaluation['probe']} (ridge {evaluation['probe_ridge']}), fitted on "
             f"{evaluation['probe_images']} calibration images of all sites, tested on their held-out images.", "",
             "| site | held-out images | original | compressed |", "|---|---|---|---|"]
    for site, row in evaluation["sites"].items():
        lines.append(f"| {site} | {row['images']} | {row['original']:.4f} | {row['compressed']:.4f} |")
    lines.append(f"| **pooled** | {evaluation['test_images']} | {evaluation['pooled']['original']:.4f} "
                 f"| {evaluation['pooled']['compressed']:.4f} |")
    return "\n".join(lines) + "\n"


PROFILE_NOTES = {"production": "TLS, registered SuperNode keys, persistent SuperLink state",
                 "development": "simulation or local test: no TLS, authentication or persistence guarantees"}


def _cell(text: str) -> str:
    """A table cell from text a site chose (its name, its reason): one line, its pipes escaped."""
    return one_line(text).replace("|", "\\|")


def federation_markdown(fed: dict[str, Any], profile: str, superlink_checks: list[str] | None = None) -> str:
    lines = ["", "## Federation", "", f"- profile: **{profile}** ({PROFILE_NOTES[profile]})",
             *(f"  - verified before round 1: `{line}`" for line in superlink_checks or ()),
             f"- sites connected: {fed['sites_connected']}; maps sha256 `{fed['maps_sha256']}`",
             "", "| round | site | status | images | array bytes sent | array bytes received | reason |",
             "|---|---|---|---|---|---|---|"]
    for rnd in fed["rounds"]:
        for site, entry in sorted(rnd["sites"].items()):
            lines.append(f"| {rnd['name']} ({rnd['seconds']:.1f} s) | {_cell(site)} | {entry['status']} "
                         f"| {entry.get('images', '')} "
                         f"| {entry.get('bytes_sent', 0):,} | {entry.get('bytes_received', 0):,} "
                         f"| {_cell(entry.get('reason', ''))} |")
    return "\n".join(lines) + "\n"

