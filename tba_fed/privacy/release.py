"""Add the Gaussian mechanism's noise to clipped sums: what a site sends instead of exact sums.

Span sums are noised in their weighted residual form (`clipped`; under ``map: auto`` both kinds' in one release),
symmetric noise on Gram matrices;
counts are noised, rounded and clamped at zero (post-processing). Noise stds come from `sensitivity`
parts, so the whole release is one Gaussian mechanism with noise multiplier σ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..plan import Span
from ..probe import ProbeStats
from ..stats import SimilarityStats
from .clipped import ClippedSpanSums
from .mechanism import NoiseSource
from .sensitivity import Part


def _stds(parts: Sequence[Part], sigma: float) -> dict[str, float]:
    return {p.name: p.std(sigma) for p in parts}


def _noisy(noise: NoiseSource, value: torch.Tensor, std: float) -> torch.Tensor:
    return value + torch.as_tensor(np.asarray(noise.normal(tuple(value.shape), std)))


def _noisy_gram(noise: NoiseSource, gram: torch.Tensor, std: float) -> torch.Tensor:
    return gram + torch.from_numpy(noise.symmetric(gram.shape[0], std))


def _count(noise: NoiseSource, count: int, std: float) -> int:
    return max(0, int(round(count + float(noise.normal((1,), std)[0]))))


def noisy_spans(per_split: Mapping[str, Mapping[Span, ClippedSpanSums]], parts: Sequence[Part], sigma: float,
                noise: NoiseSource) -> dict[str, dict[Span, ClippedSpanSums]]:
    """Noisy weighted residual-form sums for each group: a split (calibration and held-out images are disjoint),
    or ``kind/split`` when the release carries both map kinds (`sensitivity.span_label` names its parts). The
    weight sum is one statistic per split, noised once and shared by every span of both kinds (the same images,
    the same weights): a second draw would release the count twice."""
    std = _stds(parts, sigma)
    released: dict[str, dict[Span, ClippedSpanSums]] = {}
    weights: dict[str, torch.Tensor] = {}
    for group, spans in per_split.items():
        kind, _, split = group.rpartition("/")
        if split not in weights:
            weights[split] = _noisy(noise, next(iter(spans.values())).weight, std["weight"])
        weight = weights[split]
        released[group] = {}
        for span, s in spans.items():
            key = f"{kind}/{span}" if kind else str(span)
            released[group][span] = ClippedSpanSums(
                gram=_noisy_gram(noise, s.gram, std[f"{key}:gram"]),
                cross_residual=_noisy(noise, s.cross_residual, std[f"{key}:cross_residual"]),
                sum_x=_noisy(noise, s.sum_x, std[f"{key}:sum_x"]), sum_r=_noisy(noise, s.sum_r, std[f"{key}:sum_r"]),
                sum_rr=_noisy(noise, s.sum_rr, std[f"{key}:sum_rr"]), weight=weight)
    return released


def noisy_similarity(stats: SimilarityStats, parts: Sequence[Part], sigma: float, noise: NoiseSource,
                     tokens_per_image: int) -> SimilarityStats:
    """Noise on the pairs a < b (the only entries ever read) and on the per-block norms."""
    std = _stds(parts, sigma)
    upper = torch.triu(torch.ones_like(stats.sq_dist, dtype=torch.bool), diagonal=1)

    def pairs(matrix: torch.Tensor, name: str) -> torch.Tensor:
        return torch.where(upper, _noisy(noise, matrix, std[name]), torch.zeros_like(matrix))

    images = _count(noise, stats.images, std["images"])
    return SimilarityStats(tokens=images * tokens_per_image, images=images, sq_dist=pairs(stats.sq_dist, "sq_dist"),
                           cos_sum=pairs(stats.cos_sum, "cos_sum"), angle_sum=pairs(stats.angle_sum, "angle_sum"),
                           sq_norm=_noisy(noise, stats.sq_norm, std["sq_norm"]))


def noisy_probe(per_model: Mapping[str, ProbeStats], parts: Sequence[Part], sigma: float,
                noise: NoiseSource) -> dict[str, ProbeStats]:
    """Noisy probe sums; the image count is the sum of the noisy class counts (post-processing)."""
    std = _stds(parts, sigma)
    released = {}
    for name, s in per_model.items():
        counts = _noisy(noise, s.class_counts, std[f"{name}:class_counts"]).clamp_min(0.0)
        images = int(round(float(counts.sum())))
        released[name] = ProbeStats(tokens=images, images=images, gram=_noisy_gram(noise, s.gram, std[f"{name}:gram"]),
                                    cross=_noisy(noise, s.cross, std[f"{name}:cross"]),
                                    sum_f=_noisy(noise, s.sum_f, std[f"{name}:sum_f"]), class_counts=counts)
    return released


def noisy_counts(counts: Mapping[str, int], parts: Sequence[Part], sigma: float, noise: NoiseSource) -> dict[str, int]:
    """Noisy correct counts, clamped so that 0 <= correct <= total still holds."""
    std = _stds(parts, sigma)
    noisy = {k: _count(noise, v, std[k]) for k, v in counts.items()}
    total = noisy["total"]
    return {k: (v if k == "total" else min(v, total)) for k, v in noisy.items()}
