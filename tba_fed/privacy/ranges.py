"""Fixed-point ranges for secure aggregation, derived from the per-image bounds.

SecAgg+ quantises each array within ±range, so the range must hold for any site's released (noisy)
sums. With at most N images per site and weights w_i ≤ 1 that keep every per-image statistic within
its bound B_k (`clipped`), every entry of a weighted sum obeys |Σ w s_k(i)| ≤ N B_k (an entry is at
most the Frobenius norm), and the weight sum is at most N; the noise adds at most `NOISE_MARGIN` of
its standard deviation (a site clamps to the range, post-processing, in the ~1e-15-per-entry event
it does not). The quantisation error is then range × sites × 2/Q per entry
(`secure_aggregation.quantisation_error_bound`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..plan import Span
from .clipped import SpanBounds
from .policy import PrivacyRequest
from .sensitivity import Part, span_parts

NOISE_MARGIN = 8.0
SPLITS = ("calibration", "holdout")


def span_ranges(spans: Sequence[Span], bounds: Mapping[Span, SpanBounds], max_images: int, parts: Sequence[Part],
                site_sigma: float) -> dict[str, float]:
    """Range of every array `wire.encode_private_spans` produces, for one site's noisy release."""
    std = {p.name: p.std(site_sigma) for p in parts}
    out: dict[str, float] = {}
    for span in spans:
        b = bounds[span]
        k = str(span)
        limits = {"gram_triu": (b.gram, std[f"{k}:gram"]), "cross_residual": (b.cross_residual, std[f"{k}:cross_residual"]),
                  "sum_x": (b.sum_x, std[f"{k}:sum_x"]), "sum_r": (b.sum_r, std[f"{k}:sum_r"]),
                  "sum_rr": (b.sum_rr, std[f"{k}:sum_rr"]), "weight": (1.0, std["weight"])}
        for split in SPLITS:
            for name, (bound, noise) in limits.items():
                out[f"{split}/{span.key}/{name}"] = max_images * bound + NOISE_MARGIN * noise
    return out


def statistics_ranges(request: PrivacyRequest, spans: Sequence[Span], max_images: int) -> dict[str, float]:
    """The ranges of a secure statistics release: what the server expects and each site enforces."""
    bounds = request.span_bounds(spans)
    return span_ranges(spans, bounds, max_images, span_parts(spans, bounds), request.site_noise_multiplier())


def clamp(arrays: Mapping[str, np.ndarray], ranges: Mapping[str, float]) -> dict[str, np.ndarray]:
    return {k: np.clip(v, -ranges[k], ranges[k]) for k, v in arrays.items()}
