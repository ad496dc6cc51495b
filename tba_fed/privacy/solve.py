"""The server's private solve: PSD projection, AdaSSP ridge, shrinkage toward a prior map.

Also the side-by-side comparison every private or prior-based run reports per span: dropping the
blocks, the public prior alone, the sites' (private) map shrunk toward the identity (no public data),
and the sites' map shrunk toward the public prior, each as held-out error relative to dropping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from ..plan import Span
from ..solver import LinearMap, fit_quality, solve_span
from ..stats import SpanStats
from .clipped import ClippedSpanSums, to_span_stats
from .postprocess import RidgeChoice, adassp_ridge, centered_gram, clean_stats


def private_inputs(released: Mapping[Span, ClippedSpanSums], priors: Mapping[Span, LinearMap],
                   gram_noise_std: Mapping[Span, float], tokens_per_image: int, *, bias: bool
                   ) -> tuple[dict[Span, SpanStats], dict[Span, RidgeChoice]]:
    """Solvable sums and the AdaSSP ridge of every span, from the summed private release.

    The Gram is projected in the release's own residual form, before the sums around the prior are
    rebuilt, so the projection never leaks into the cross-product: the solve is then exactly
    P + (G̃₊ + λI)⁻¹ D̃ (ridge and projection on the centred Gram when there is a bias).
    """
    stats, ridges = {}, {}
    for span, sums in released.items():
        raw = to_span_stats(sums, priors[span], tokens_per_image)
        ridges[span] = adassp_ridge(centered_gram(raw) if bias else raw.gram, gram_noise_std[span])
        projected = replace(sums, gram=clean_stats(raw, bias=bias).gram)
        stats[span] = to_span_stats(projected, priors[span], tokens_per_image)
    return stats, ridges


def compare_priors(calibration: SpanStats, holdout: SpanStats, *, bias: bool, ridge_lambda: float | None,
                   ridge: float, public: LinearMap | None, shrink_bias: bool = False) -> dict[str, float]:
    """Held-out error of each candidate, relative to the identity skip's (1.0 = as good as dropping)."""
    identity = LinearMap.identity(calibration.dim)
    base = fit_quality(holdout, identity).sse
    candidates = {"identity": identity,
                  "federated": solve_span(calibration, bias=bias, ridge=ridge, ridge_lambda=ridge_lambda, prior=identity,
                                            shrink_bias=shrink_bias)[0]}
    if public is not None:
        candidates["public prior"] = public
        candidates["federated + public prior"] = solve_span(calibration, bias=bias, ridge=ridge, ridge_lambda=ridge_lambda,
                                                          prior=public, shrink_bias=shrink_bias)[0]
    return {name: fit_quality(holdout, m).sse / max(base, 1e-300) for name, m in candidates.items()}
