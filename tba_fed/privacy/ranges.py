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
from .sensitivity import SPAN_SHARES, Part, kind_span_parts, labelled_bounds

NOISE_MARGIN = 8.0


def span_ranges(spans: Sequence[Span | str], bounds: Mapping[Span | str, SpanBounds], max_images: int,
                parts: Sequence[Part], site_sigma: float) -> dict[Span | str, dict[str, float]]:
    """Range of each statistic of each span's (or `span_label`'s) noisy sums (the same in both splits), for one
    site's release; the statistics are those `span_parts` gives a sensitivity, so the two cannot drift apart."""
    std = {p.name: p.std(site_sigma) for p in parts}
    out: dict[Span | str, dict[str, float]] = {}
    for span in spans:
        limits = {name: (getattr(bounds[span], name), std[f"{span}:{name}"]) for name in SPAN_SHARES}
        limits["weight"] = (1.0, std["weight"])  # the weighted image count: each weight at most 1
        out[span] = {name: max_images * bound + NOISE_MARGIN * noise for name, (bound, noise) in limits.items()}
    return out


def statistics_ranges(request: PrivacyRequest, spans: Sequence[Span], max_images: int, kinds: Sequence[str]
                      ) -> dict[Span | str, dict[str, float]]:
    """The ranges of a secure statistics release of `kinds`, by `span_label`: what the server expects and each
    site enforces."""
    bounds = request.kind_bounds(spans, kinds)
    labelled = labelled_bounds(bounds)
    return span_ranges(list(labelled), labelled, max_images, kind_span_parts(bounds), request.site_noise_multiplier())


def clamp(arrays: Mapping[str, np.ndarray], ranges: Mapping[str, float]) -> dict[str, np.ndarray]:
    return {k: np.clip(v, -ranges[k], ranges[k]) for k, v in arrays.items()}
