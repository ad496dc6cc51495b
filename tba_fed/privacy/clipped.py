"""Span sums for a private release: per-image weights that bound each image's contribution.

A private span release is a weighted least-squares problem. Image i gets one weight
w_i = min(1, B_k / ‖s_k(i)‖) over its per-image statistics s_k(i), so every statistic of every image
is bounded (‖w_i s_k(i)‖ ≤ B_k: the sensitivities) while the sums stay consistent with each other
(the fit is the weighted least-squares fit, unbiased for a linear relation). The statistics are
taken in residual form around the run's prior map P (R_i = Y_i − P(X_i)): near a good prior the
residual is small, so its cross-product needs little noise.

    G = Σ w XᵀX     D = Σ w XᵀR     Σ w 1ᵀX     Σ w 1ᵀR     Σ w ‖R‖²_F     Σ w

Per image, ‖X_iᵀX_i‖_F = ‖X_iX_iᵀ‖_F and ‖X_iᵀR_i‖_F² = ⟨X_iX_iᵀ, R_iR_iᵀ⟩ use T×T token Grams,
cheap next to the forward pass. Measured on DINOv2-S, ‖X_iᵀX_i‖_F is about 0.45 ‖X_i‖_F²: bounding
it directly needs half the noise of bounding ‖X_i‖_F (docs/privacy.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch

from ..errors import TBAInputError
from ..solver import LinearMap
from ..stats import SpanStats

STATISTICS = ("gram", "cross_residual", "sum_x", "sum_r", "sum_rr")


@dataclass(frozen=True)
class SpanBounds:
    """Per-image bounds: ‖XᵀX‖_F, ‖XᵀR‖_F, ‖1ᵀX‖, ‖1ᵀR‖, ‖R‖²_F."""

    gram: float
    cross_residual: float
    sum_x: float
    sum_r: float
    sum_rr: float

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (value > 0 and math.isfinite(value)):
                raise TBAInputError("privacy.clip_spans", f"bound {f.name} must be positive and finite, got {value}")

    def as_tuple(self) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in STATISTICS)


def image_norms(x: torch.Tensor, r: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each image's statistic norms, x and r: [images, tokens, dim] (float64)."""
    xx = x @ x.transpose(1, 2)
    rr = r @ r.transpose(1, 2)
    return {"gram": xx.flatten(1).norm(dim=1), "cross_residual": (xx * rr).sum((1, 2)).clamp_min(0).sqrt(),
            "sum_x": x.sum(1).norm(dim=1), "sum_r": r.sum(1).norm(dim=1), "sum_rr": r.flatten(1).square().sum(1)}


def image_weights(norms: Mapping[str, torch.Tensor], bounds: SpanBounds) -> torch.Tensor:
    """w_i = min(1, B_k / ‖s_k(i)‖): the largest weight that keeps every statistic within its bound."""
    ratios = [(getattr(bounds, k) / norms[k].clamp_min(1e-300)).clamp(max=1.0) for k in STATISTICS]
    return torch.stack(ratios).min(dim=0).values


def residual(x: torch.Tensor, y: torch.Tensor, prior: LinearMap) -> torch.Tensor:
    return y - prior.apply(x)


def release_weights(pairs: Mapping, priors: Mapping, bounds: Mapping[object, SpanBounds]) -> torch.Tensor:
    """Each image's one weight for every span of a release: the smallest of its span weights. The release
    carries one count (Σ w), which is then every span's exact weight sum; per-span weights would leave the
    other spans' counts (and their centred Grams) inconsistent with their sums."""
    weights = [image_weights(image_norms(x, residual(x, y, priors[span])), bounds[span])
               for span, (x, y) in pairs.items()]
    return torch.stack(weights).min(dim=0).values


@dataclass
class ClippedSpanSums:
    """Weighted residual-form sums of one span (float64); `weight` is Σ w_i (images, fractionally)."""

    gram: torch.Tensor
    cross_residual: torch.Tensor
    sum_x: torch.Tensor
    sum_r: torch.Tensor
    sum_rr: torch.Tensor
    weight: torch.Tensor
    images: int = 0
    clipped: int = 0

    @classmethod
    def zeros(cls, dim: int) -> ClippedSpanSums:
        z = torch.zeros
        return cls(z(dim, dim, dtype=torch.float64), z(dim, dim, dtype=torch.float64), z(dim, dtype=torch.float64),
                   z(dim, dtype=torch.float64), z((), dtype=torch.float64), z((), dtype=torch.float64))

    def update(self, x: torch.Tensor, y: torch.Tensor, prior: LinearMap, w: torch.Tensor) -> None:
        """Add a batch: x, y are a span's (input, target) pair, [images, tokens, dim] (`ViTAdapter.span_pairs`),
        float64; w the images' weights (`release_weights`), which keep every statistic within its bound."""
        r = residual(x, y, prior)
        wx = x * w[:, None, None]
        flat_wx, flat_x, flat_r = wx.reshape(-1, x.shape[-1]), x.reshape(-1, x.shape[-1]), r.reshape(-1, r.shape[-1])
        self.gram += flat_wx.T @ flat_x
        self.cross_residual += flat_wx.T @ flat_r
        self.sum_x += wx.sum((0, 1))
        self.sum_r += (r * w[:, None, None]).sum((0, 1))
        self.sum_rr += (w * r.flatten(1).square().sum(1)).sum()
        self.weight += w.sum()
        self.images += int(x.shape[0])
        self.clipped += int((w < 1).sum())

    def __add__(self, other: ClippedSpanSums) -> ClippedSpanSums:
        return ClippedSpanSums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __radd__(self, other: int) -> ClippedSpanSums:
        """``sum()`` of sites' releases starts from 0."""
        return self if other == 0 else NotImplemented

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name).numpy() for name in (*STATISTICS, "weight")}


def to_span_stats(sums: ClippedSpanSums, prior: LinearMap, tokens_per_image: int) -> SpanStats:
    """The ordinary sums of (x, y = P(x) + r), from the residual form (exact algebra, post-processing).

    The (possibly noisy) weight is rounded to a whole number of images and clamped at zero.
    """
    images = max(0, int(round(float(sums.weight))))
    n = float(images * tokens_per_image)
    w = prior.weight.to(torch.float64)
    b = torch.zeros(w.shape[0], dtype=torch.float64) if prior.bias is None else prior.bias.to(torch.float64)
    gram = (sums.gram + sums.gram.T) / 2
    cross = sums.cross_residual + gram @ w.T + torch.outer(sums.sum_x, b)
    sum_y = sums.sum_r + w @ sums.sum_x + n * b
    sum_yy = (sums.sum_rr + torch.sum((w @ gram) * w) + n * (b @ b) + 2 * torch.sum(sums.cross_residual * w.T)
              + 2 * b @ sums.sum_r + 2 * b @ (w @ sums.sum_x))
    return SpanStats(tokens=int(n), images=images, gram=gram, cross=cross, sum_x=sums.sum_x.clone(), sum_y=sum_y,
                     sum_yy=sum_yy)

