"""The server's side of a run, orchestration only: ask the sites for sums, solve, install, report.

Rounds: (1) similarity, only when a budget must choose the plan; (2) span statistics, released as the run's
privacy section says (`releases`: exact, local DP or secure); (3) install (maps + plan out, checksums back);
(4-5) evaluation, when enabled (`evaluation`). Each round is a `rounds.exchange`: every reply is checked
before it is used, and a site that errors, times out or sends a bad reply is excluded and named in the report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ConfigRecord, MessageType, RecordDict
from flwr.serverapp import Grid

from ..adapter import ViTAdapter
from ..checkpoint import maps_checksum
from ..compressed import parameter_report
from ..errors import TBAInputError
from ..fileio import check_output_dir
from ..models import create_model
from ..pipeline import Compression, choose_plan, solve_kinds, span_kinds
from ..privacy.public_prior import public_prior_maps
from ..public_images import public_loader
from ..report import compression_dict
from ..solver import LinearMap
from .config import FederatedRunConfig, fixed_plan
from .delivery import BoundedGrid
from .evaluation import evaluate
from .records import from_record, to_record
from .releases import check_images, release_for
from .rounds import Rounds, wait_for_nodes
from .run_report import prior_comparison, write_run
from .server_audit import ServerAudit
from .wire import decode_similarity, encode_maps

_logger = logging.getLogger(__name__)


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
    tokens, dim = adapter.tokens_per_image(config.token_mode), adapter.embed_dim
    model_json = config.model.model_dump_json()
    rounds = Rounds(grid, wait_for_nodes(grid, fed.num_sites, fed.min_sites, fed.round_timeout),
                    timeout=fed.round_timeout, min_sites=fed.min_sites, audit=audit)
    _logger.info("federation: %d sites connected", rounds.connected)
    prior_kind = config.prior_kind
    public = public_loader(model, config.privacy.public_images if config.privacy else 336) \
        if config.privacy or prior_kind == "public" else None
    release = release_for(config, model, public)

    def content(**values: Any) -> Callable[[], RecordDict]:
        settings = {"model": model_json, "token-mode": config.token_mode, "map": config.map, "profile": config.profile,
                    **values}
        return lambda: RecordDict({"config": ConfigRecord(settings)})

    similarity = None
    if plan is None:  # a budget: the sites' summed similarity chooses the plan
        request = release.similarity_request()

        def accept_similarity(reply: RecordDict):
            stats = decode_similarity(from_record(reply.array_records["similarity"]), adapter.num_blocks)
            check_images(stats.images, fed.min_images_per_site, "similarity.images")
            return stats

        replies = rounds.ask("similarity", f"{MessageType.QUERY}.similarity",
                             content(privacy=request.to_json() if request is not None else ""), accept_similarity,
                             images=lambda stats: stats.images)
        similarity = sum(replies.values())
        plan = choose_plan(model, similarity, blocks=config.budget.blocks, params=config.budget.params,
                           metric=config.budget.metric, bias=config.bias, map_kind=config.map)
        _logger.info("plan chosen from %d sites' similarity: %s", len(replies), plan)

    # public prior maps are fitted for one map kind: a map: auto run (prior identity or zero) compares without them
    public_maps = public_prior_maps(model, public, plan.spans, config.token_mode, config.bias, config.map) \
        if public and config.map != "auto" else {}
    priors = ({s: LinearMap(torch.eye(dim, dtype=torch.float64), None) for s in plan.spans} if prior_kind == "identity"
              else public_maps if prior_kind == "public"
              else {s: LinearMap(torch.zeros(dim, dim, dtype=torch.float64), None) for s in plan.spans})
    released, sites = release.statistics_round(rounds, plan, dim, content(**release.statistics_settings(model, plan, priors)))
    inputs = release.solver_inputs(released, sites, priors, tokens, plan.spans)
    fits = solve_kinds(inputs.calibration, inputs.holdout, map_kind=config.map, bias=config.bias, ridge=config.ridge,
                       identity=frozenset(identity), priors=dict.fromkeys(inputs.calibration, priors),
                       ridge_lambdas=inputs.ridge_lambdas, shrink_bias=release.private)
    maps = {span: fit.map for span, fit in fits.items()}
    compression = Compression(
        base=model, plan=plan, fits=fits,
        parameters=parameter_report(model, plan, bias=config.bias, identity=frozenset(identity),
                                    map_kind=span_kinds(fits)),
        token_mode=config.token_mode, bias=config.bias, ridge=config.ridge, calibration_images=inputs.calibration_images,
        holdout_images=inputs.holdout_images, source=config.model, map_kind=config.map)
    compression.model.eval()  # built before any site installs the maps: maps that overflow the dtype are refused
    report = compression_dict(compression)
    report["profile"] = config.profile  # sites check it against their own before serving
    if superlink_checks:
        report["superlink_checks"] = superlink_checks
    report["prior"] = prior_kind
    if inputs.privacy is not None:
        report["privacy"] = inputs.privacy
    if (release.private or public_maps) and inputs.holdout_images > 0:
        report |= prior_comparison(inputs, release.holdout_draws(released, priors, tokens),
                                   {s: fit.map.kind for s, fit in fits.items()}, public_maps, identity,
                                   bias=config.bias, ridge=config.ridge, private=release.private)

    expected = maps_checksum(maps)
    base = {"model": model_json, "profile": config.profile, "plan": str(plan), "map": config.map,
            "identity-spans": ", ".join(map(str, identity))}
    if config.map == "auto":  # each fitted span's chosen kind, which the sites build the model with
        base["span-maps"] = json.dumps({str(s): m.kind for s, m in sorted(maps.items()) if m.kind != "identity"})

    def accept_install(reply: RecordDict) -> str:
        digest = str(reply.config_records["install"]["checksum"])
        if digest != expected:
            raise TBAInputError("install.checksum", f"site installed maps with sha256 {digest[:12]}…, "
                                                    f"the server sent {expected[:12]}…")
        return digest

    install = {**base, "report": json.dumps(report)}
    rounds.ask("install", f"{MessageType.TRAIN}.install",
               lambda: RecordDict({"maps": to_record(encode_maps(maps)), "config": ConfigRecord(install)}), accept_install)
    if config.evaluation.enabled:
        report["evaluation"] = evaluate(rounds, config, release, base, maps, int(model.num_features))
    report["federation"] = {"sites_connected": rounds.connected, "maps_sha256": expected, "rounds": rounds.report()}
    report_json = write_run(config.output, config.overwrite, maps, report, config.profile, superlink_checks, similarity,
                            config.audit_log)
    audit.result(expected, config.output, report_json)
    _logger.info("federated run complete: %s written", config.output)
    return report
