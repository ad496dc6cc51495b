"""The engine's streaming passes for a private release: each image's contribution bounded before it is summed.

The engine (`calibrate`, `probe`) knows nothing of privacy: its passes take a hook that rewrites a batch before
it is summed, and this module supplies the clipping (`sensitivity.clip_images`) and the weighted residual-form
span sums (`clipped`). The dependency runs one way, privacy/ → engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..adapter import ViTAdapter
from ..calibrate import collect_similarity, kind_span_pairs
from ..errors import TBAInputError
from ..plan import Span
from ..probe import ProbeStats, collect_probe_stats
from ..solver import LinearMap
from ..stats import SimilarityStats
from .clipped import ClippedSpanSums, SpanBounds, release_weights
from .sensitivity import clip_images


def collect_clipped_similarity(adapter: ViTAdapter, batches: Iterable, clip: Sequence[float], *,
                               token_mode: str = "all", device: str | torch.device = "cpu") -> SimilarityStats:
    """Similarity sums with each image's token matrix at block b clipped to `clip[b]` (Frobenius)."""
    if len(clip) != adapter.num_blocks:
        raise TBAInputError("privacy.clip", f"{len(clip)} clipping bounds for {adapter.num_blocks} blocks")
    return collect_similarity(adapter, batches, token_mode=token_mode, device=device,
                              transform=lambda block, tokens: clip_images(tokens, clip[block])[0])


def collect_clipped_probe_stats(model: nn.Module, batches: Iterable, num_classes: int, clip: float, *,
                                device: str | torch.device = "cpu") -> ProbeStats:
    """Probe sums with each image's feature vector clipped to `clip` (L2)."""
    return collect_probe_stats(model, batches, num_classes, device=device,
                               transform=lambda features: clip_images(features, clip)[0])


def collect_clipped_span_sums(adapter: ViTAdapter, batches: Iterable, spans: Sequence[Span], *, token_mode: str,
                              bounds: Mapping[Span, SpanBounds], priors: Mapping[Span, LinearMap],
                              device: str | torch.device = "cpu", map_kind: str = "linear") -> dict[Span, ClippedSpanSums]:
    """`collect_clipped_kind_sums` of one map kind."""
    return collect_clipped_kind_sums(adapter, batches, spans, token_mode=token_mode, bounds={map_kind: bounds},
                                     priors=priors, device=device)[map_kind]


def collect_clipped_kind_sums(adapter: ViTAdapter, batches: Iterable, spans: Sequence[Span], *, token_mode: str,
                              bounds: Mapping[str, Mapping[Span, SpanBounds]], priors: Mapping[Span, LinearMap],
                              device: str | torch.device = "cpu") -> dict[str, dict[Span, ClippedSpanSums]]:
    """The span pass for a private release of each map kind in `bounds` (kind -> span -> bounds; ``map: auto``
    releases both) from one forward per batch: weighted residual-form sums of every span's (input, target) pair
    of each kind (`clipped`; a folded span's pair is (m_s, x_e − h_s)), with ONE weight per image over every
    statistic of every span of every kind, so the release's one count is every group's exact weight sum and each
    statistic stays within its kind's bound. `priors` are per span: the identity and zero priors mean the same
    for both kinds (public priors are fitted for one kind and are refused under ``map: auto``)."""
    kinds = tuple(bounds)
    sums = {kind: {span: ClippedSpanSums.zeros(adapter.embed_dim) for span in spans} for kind in kinds}
    keyed_priors = {(kind, span): priors[span] for kind in kinds for span in spans}
    keyed_bounds = {(kind, span): bounds[kind][span] for kind in kinds for span in spans}
    with torch.inference_mode():
        for pairs in kind_span_pairs(adapter, batches, spans, token_mode, device, kinds):
            pairs = {(kind, span): (x.cpu().to(torch.float64), y.cpu().to(torch.float64))
                     for kind, per_span in pairs.items() for span, (x, y) in per_span.items()}
            weights = release_weights(pairs, keyed_priors, keyed_bounds)
            for kind, per_span in sums.items():
                for span, acc in per_span.items():
                    acc.update(*pairs[kind, span], priors[span], weights)
    return sums
