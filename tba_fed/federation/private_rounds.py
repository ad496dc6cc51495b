"""The server's private side: the secure-aggregation statistics round and the privacy report.

Under secure aggregation the server never holds one site's sums: SecAgg+ hands it the sum over at
least ``min_sites`` sites, which is decoded and validated like any private reply (keys, shapes,
float64, finiteness; no PSD check, since the noisy Gram is legitimately indefinite).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import RecordDict
from flwr.serverapp import Grid

from ..plan import Plan, Span
from ..privacy.clipped import ClippedSpanSums
from ..privacy.accounting import replace_one_epsilon
from ..privacy.mechanism import describe_noise
from ..privacy.policy import PrivacyRequest
from ..privacy.postprocess import RidgeChoice
from ..privacy.ranges import statistics_ranges
from .config import FederatedRunConfig, PrivacyConfig
from .secure_aggregation import default_protocol, secure_sum
from .server_audit import ServerAudit
from .wire import decode_private_spans, private_span_shapes

_logger = logging.getLogger(__name__)


def secure_statistics_round(grid: Grid, nodes: list[int], config: FederatedRunConfig, request: PrivacyRequest,
                            plan: Plan, dim: int, content: RecordDict, log: Any, audit: ServerAudit | None = None
                            ) -> tuple[dict[str, dict[Span, ClippedSpanSums]], int]:
    """SecAgg+ sum of the sites' noisy span sums (each site adds σ/√noise_sites of the noise)."""
    fed = config.federation
    ranges = statistics_ranges(request, plan.spans, fed.max_images_per_site)
    settings = {**dict(content.config_records["config"].items()), "max-images": fed.max_images_per_site}
    try:
        # the server must not be able to unmask a sum over fewer sites than the noise is split across
        threshold = max(default_protocol(len(nodes))[1], request.noise_sites)
        result = secure_sum(grid, nodes, settings, ranges, private_span_shapes(plan.spans, dim),
                            timeout=fed.round_timeout, min_sites=fed.min_sites, reconstruction_threshold=threshold,
                            site_names=log.names)
    except Exception as err:  # recorded, then the run stops
        if audit is not None:
            audit.secure_round(log.name, log.names, nodes, settings, None, str(err))
        raise
    if audit is not None:
        audit.secure_round(log.name, log.names, nodes, settings, result)
    summed = decode_private_spans(result.arrays, plan.spans, dim)
    log.seconds = result.seconds
    log.sites["secure sum"] = {"node_id": -1, "status": "ok",
                               "images": int(round(float(summed["calibration"][plan.spans[0]].weight))),
                               "reason": f"SecAgg+ sum of {result.sites} sites; quantisation error <= "
                                         f"{max(b / ranges[k] for k, b in result.error_bound.items()):.2e} of each range"}
    log.nodes = list(nodes)
    _logger.info("statistics: secure sum of %d sites in %.1f s", result.sites, result.seconds)
    return summed, result.sites


def privacy_summary(privacy: PrivacyConfig, request: PrivacyRequest, sigma: float, sites: int,
                    ridges: Mapping[Span, RidgeChoice], gram_std: Mapping[Span, float]) -> dict[str, Any]:
    secure = privacy.aggregation == "secure"
    return {
        "epsilon": privacy.epsilon, "delta": privacy.delta, "accountant": privacy.accountant,
        "adjacency": "add/remove one image",
        "epsilon_replace_one": replace_one_epsilon([(sigma, len(request.releases))], privacy.delta, privacy.accountant),
        "releases": list(request.releases), "noise_multiplier": sigma,
        "aggregation": "secure aggregation (SecAgg+), noise split over sites" if secure else "local noise at each site",
        "noise_sites": request.noise_sites, "sites_summed": sites,
        "noise": describe_noise(privacy.seed),
        "clip_spans": {k: list(v) for k, v in request.clip_spans.items()},
        "spans": {str(s): {"gram_noise_std": gram_std[s], "ridge_lambda": r.ridge_lambda, "noise_bound": r.noise_bound,
                           "min_eigenvalue_estimate": r.min_eigenvalue_estimate} for s, r in ridges.items()},
    }


def privacy_markdown(report: Mapping[str, Any]) -> str:
    lines = []
    if "privacy" in report:
        p = report["privacy"]
        lines += ["", "## Privacy", "",
                  f"- (ε, δ) = ({p['epsilon']:g}, {p['delta']:g}) per site over {len(p['releases'])} release(s) "
                  f"({', '.join(p['releases'])}), {p['accountant'].upper()} accounting: noise multiplier σ = "
                  f"{p['noise_multiplier']:.4g}",
                  f"- the unit protected is one image, under add/remove-one-image adjacency; under replace-one adjacency "
                  f"the same noise gives ε ≤ {p['epsilon_replace_one']:.3g}",
                  f"- {p['aggregation']}; {p['sites_summed']} sites summed; noise: {p['noise']}",
                  "- image counts above are released counts: noisy sums of the per-image weights that bound each "
                  "image's contribution (an image far outside the bounds counts less than one)",
                  "- the Gram matrices were projected onto the PSD cone; ridge λ from AdaSSP (noise bound minus a "
                  "private estimate of the smallest eigenvalue):", ""]
        lines += [f"  - {s}: λ = {v['ridge_lambda']:.4g} (noise bound {v['noise_bound']:.4g})" for s, v in p["spans"].items()]
    if "prior_comparison" in report:
        noisy = (" (estimated from the noisy held-out sums; ± is the spread those estimates get from the release's "
                 "own noise, and the calibration columns above come from noisy sums too)") if "privacy" in report else ""
        names = list(next(iter(report["prior_comparison"].values())))
        lines += ["", "## What the sites' data bought", "",
                  f"Held-out error relative to dropping the blocks{noisy}; installed prior: {report['prior']}.", "",
                  "| span | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        spread = report.get("prior_comparison_std", {})
        for span, row in report["prior_comparison"].items():
            cells = [f"{row[n]:.4f}" + (f" ± {spread[span][n]:.4f}" if n in spread.get(span, {}) else "") for n in names]
            lines.append(f"| {span} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if lines else ""
