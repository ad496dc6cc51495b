"""The server's private solve: PSD projection, AdaSSP ridge, shrinkage toward a prior map.

Also the side-by-side comparison every private or prior-based run reports per span: dropping the
blocks, the public prior alone, the sites' (private) map shrunk toward the identity (no public data),
and the sites' map shrunk toward the public prior, each as held-out error relative to dropping.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..plan import Span
from ..solver import LinearMap, fit_quality, solve_span
from ..stats import SpanStats
from .postprocess import RidgeChoice, adassp_ridge, centered_gram, clean_stats


def private_inputs(calibration: Mapping[Span, SpanStats], gram_noise_std: Mapping[Span, float], *, bias: bool
                   ) -> tuple[dict[Span, SpanStats], dict[Span, RidgeChoice]]:
    """PSD-projected sums and the AdaSSP ridge of every span (on the centred Gram with a bias)."""
    ridges = {span: adassp_ridge(centered_gram(stats) if bias else stats.gram, gram_noise_std[span])
              for span, stats in calibration.items()}
    return {span: clean_stats(stats, bias=bias) for span, stats in calibration.items()}, ridges


def compare_priors(calibration: SpanStats, holdout: SpanStats, *, bias: bool, ridge_lambda: float | None,
                   ridge: float, public: LinearMap | None) -> dict[str, float]:
    """Held-out error of each candidate, relative to the identity skip's (1.0 = as good as dropping)."""
    identity = LinearMap.identity(calibration.dim)
    base = fit_quality(holdout, identity).sse
    candidates = {"identity": identity,
                  "federated": solve_span(calibration, bias=bias, ridge=ridge, ridge_lambda=ridge_lambda, prior=identity)[0]}
    if public is not None:
        candidates["public prior"] = public
        candidates["federated + public prior"] = solve_span(calibration, bias=bias, ridge=ridge, ridge_lambda=ridge_lambda,
                                                          prior=public)[0]
    return {name: fit_quality(holdout, m).sse / max(base, 1e-300) for name, m in candidates.items()}
