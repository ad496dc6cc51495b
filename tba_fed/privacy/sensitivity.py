"""Per-image clipping and the L2 sensitivity of every released statistic (derivation: docs/privacy.md).

Neighbouring datasets differ by adding or removing one image (all its tokens). Span sums weight each
image so that each of its statistics is within a bound (`clipped.SpanBounds`): the bound is the
sensitivity, and the weight sum (the image count) has sensitivity 1. Similarity and probe releases
clip each image's token matrix (or feature vector) in Frobenius norm instead.

Releasing several statistics with noise std σ_j = σ Δ_j / √share_j (Σ shares = 1) is one Gaussian
mechanism with noise multiplier σ. Held-out sums come from images disjoint from the calibration
images, so they ride in the same release at no extra cost (parallel composition).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import TBAInputError
from ..plan import Span
from .clipped import SpanBounds


@dataclass(frozen=True)
class Part:
    """One released statistic: its L2 sensitivity and its share of the mechanism's budget."""

    name: str
    sensitivity: float
    share: float

    def std(self, sigma: float) -> float:
        return sigma * self.sensitivity / math.sqrt(self.share)


def check_shares(parts: Sequence[Part]) -> None:
    total = sum(p.share for p in parts)
    if any(p.share <= 0 for p in parts) or abs(total - 1.0) > 1e-9:
        raise ValueError(f"budget shares must be positive and sum to 1, got {total}")


def clip_images(x: torch.Tensor, bound: float) -> tuple[torch.Tensor, int]:
    """Scale each image's token matrix [images, tokens, dim] to Frobenius norm at most `bound`, in float64.

    Scaling in float32 rounds every entry and can leave the norm ~1e-7 above the bound, and the
    sensitivity with it; in float64 only float64 rounding remains. Returns the float64 images.
    """
    if not (bound > 0 and math.isfinite(bound)):
        raise TBAInputError("privacy.clip", f"clipping bounds must be positive and finite, got {bound}")
    x = x.to(torch.float64)
    norms = x.flatten(1).norm(dim=1)
    scale = (bound / norms.clamp_min(1e-300)).clamp(max=1.0)
    return x * scale.view(-1, *([1] * (x.ndim - 1))), int((norms > bound).sum())


# Shares within one span: the Gram and the residual cross-product carry the map; the sums, the
# residual energy (identity-skip error) and the weight (image count) need little.
SPAN_SHARES = {"gram": 0.45, "cross_residual": 0.45, "sum_x": 0.025, "sum_r": 0.025, "sum_rr": 0.025}
IMAGES_SHARE = 0.025  # the (weighted) image count, released once for all spans (shares sum to 1)


def span_label(kind: str, span: Span, kinds: Sequence[str]) -> str:
    """A span's name in a statistics release (its parts, its bounds in ``clip_spans``, its noise): the span alone
    when the release carries one map kind, ``kind/span`` when it carries both (``map: auto``)."""
    return str(span) if len(kinds) == 1 else f"{kind}/{span}"


def labelled_bounds(bounds: Mapping[str, Mapping[Span, SpanBounds]]) -> dict[str, SpanBounds]:
    """Each kind's span bounds (kind -> span -> bounds) keyed by their `span_label`."""
    return {span_label(kind, span, tuple(bounds)): b for kind, per_span in bounds.items() for span, b in per_span.items()}


def span_parts(spans: Sequence[Span | str], bounds: Mapping[Span | str, SpanBounds]) -> list[Part]:
    """Parts of one statistics release over `spans` (or `span_label`s): each statistic's sensitivity is its
    per-image bound (`clipped.image_weights` enforces it); each gets an equal share of what the count leaves."""
    parts = [Part("weight", 1.0, IMAGES_SHARE)]
    for span in spans:
        parts += [Part(f"{span}:{k}", getattr(bounds[span], k), SPAN_SHARES[k] / len(spans)) for k in SPAN_SHARES]
    check_shares(parts)
    return parts


def kind_span_parts(bounds: Mapping[str, Mapping[Span, SpanBounds]]) -> list[Part]:
    """Parts of a statistics release of each kind in `bounds` (kind -> span -> bounds), one Gaussian mechanism:
    under ``map: auto`` the span shares split evenly over both kinds' spans, so at the same σ (the same ε) every
    statistic's noise std is √2 times a one-kind release's (docs/privacy.md)."""
    labelled = labelled_bounds(bounds)
    return span_parts(list(labelled), labelled)


SIMILARITY_SHARES = {"sq_dist": 0.3, "sq_norm": 0.1, "cos_sum": 0.25, "angle_sum": 0.25, "images": 0.1}


def similarity_parts(clip: Sequence[float], tokens_per_image: int) -> list[Part]:
    """Per image: ‖x_b − x_a‖² summed over tokens ≤ (c_a + c_b)², |cos| and angle/π ≤ 1 per token."""
    pairs = [(a, b) for b in range(len(clip)) for a in range(b)]
    delta = {"sq_dist": math.sqrt(sum((clip[a] + clip[b]) ** 4 for a, b in pairs)),
             "sq_norm": math.sqrt(sum(c**4 for c in clip)),
             "cos_sum": tokens_per_image * math.sqrt(len(pairs)), "angle_sum": tokens_per_image * math.sqrt(len(pairs)),
             "images": 1.0}
    parts = [Part(k, delta[k], SIMILARITY_SHARES[k]) for k in SIMILARITY_SHARES]
    check_shares(parts)
    return parts


PROBE_SHARES = {"gram": 0.6, "cross": 0.3, "sum_f": 0.05, "class_counts": 0.05}  # per model, split over models


def probe_parts(models: Sequence[str], clip_features: float) -> list[Part]:
    """Per image: one feature vector clipped to `clip_features`, one one-hot label (norm 1)."""
    c = clip_features
    delta = {"gram": c * c, "cross": c, "sum_f": c, "class_counts": 1.0}
    parts = [Part(f"{m}:{k}", delta[k], PROBE_SHARES[k] / len(models)) for m in models for k in PROBE_SHARES]
    check_shares(parts)
    return parts


def accuracy_parts() -> list[Part]:
    """One image changes each of the correct counts and the total by at most 1."""
    return [Part(k, 1.0, 1 / 3) for k in ("original_correct", "compressed_correct", "total")]
