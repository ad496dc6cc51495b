"""The server's private solve: PSD projection, AdaSSP ridge, shrinkage toward a prior map.

Also the side-by-side comparison every private or prior-based run reports per span: dropping the
blocks, the public prior alone, the sites' (private) map shrunk toward the identity (no public data),
and the sites' map shrunk toward the public prior, each as held-out error relative to dropping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

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
                   ridge: float, public: LinearMap | None, shrink_bias: bool = False,
                   holdout_draws: Sequence[SpanStats] = ()) -> tuple[dict[str, float | None], dict[str, float]]:
    """Held-out error of each candidate relative to the identity skip's (1.0 = as good as dropping),
    and its standard deviation over `holdout_draws` (the held-out sums re-noised as they were
    released: how much the release's own noise moves each estimate; empty for exact sums). None where the
    noisy held-out identity error is not positive."""
    def shrunk_toward(prior: LinearMap) -> LinearMap:
        return solve_span(calibration, bias=bias, ridge=ridge, ridge_lambda=ridge_lambda, prior=prior, shrink_bias=shrink_bias)[0]

    identity = LinearMap.identity(calibration.dim)
    candidates = {"identity": identity, "federated": shrunk_toward(identity)}
    if public is not None:
        candidates |= {"public prior": public, "federated + public prior": shrunk_toward(public)}

    def errors(held: SpanStats, reference: float) -> dict[str, float]:
        return {name: fit_quality(held, m).sse / reference for name, m in candidates.items()}

    # a draw whose noisy count rounds to zero, or whose noisy identity error is not positive, has no ratio
    draws = [errors(h, reference) for h in holdout_draws
             if h.tokens > 0 and (reference := fit_quality(h, identity).sse) > 0]
    spread = {name: float(np.std([d[name] for d in draws])) for name in candidates} if draws else {}
    reference = fit_quality(holdout, identity).sse
    if not reference > 0:  # noise took the held-out identity error to zero or below: there is no ratio to report
        return dict.fromkeys(candidates), spread
    return errors(holdout, reference), spread
