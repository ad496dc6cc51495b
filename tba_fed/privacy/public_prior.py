"""What the server learns from public photos, at no privacy cost: clipping bounds and prior maps.

A span's map is largely a property of the model, so a map fitted on public, out-of-domain photos
is a far better prior than zero or the identity; and the typical size of a block's output on
photos sets the clipping bounds without spending budget on a private quantile.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter import ViTAdapter
from ..calibrate import collect_kind_stats
from ..plan import Span
from ..probe import features
from ..solver import LinearMap, solve_span
from .clipped import STATISTICS, SpanBounds, image_norms, residual

_logger = logging.getLogger(__name__)
PRIOR_RIDGE = 1e-6  # public data: only numerical regularisation


@dataclass(frozen=True)
class PublicNorms:
    """Per-image Frobenius norms on public images: block outputs [images, L] and features [images]."""

    blocks: torch.Tensor
    features: torch.Tensor

    def block_bounds(self, scale: float) -> tuple[float, ...]:
        return tuple(float(v) * scale for v in self.blocks.median(dim=0).values)

    def feature_bound(self, scale: float) -> float:
        return float(self.features.median()) * scale


def public_norms(model: nn.Module, batches: Iterable, token_mode: str) -> PublicNorms:
    adapter = ViTAdapter(model)
    blocks, feats = [], []
    model.eval()
    with torch.inference_mode():
        for images, _ in batches:
            outs = [adapter.image_tokens(x, token_mode).double()
                    for x in adapter.iter_block_outputs(images, adapter.num_blocks - 1)]
            blocks.append(torch.stack([x.flatten(1).norm(dim=1) for x in outs], dim=1))
            feats.append(features(model, images).double().norm(dim=1))
    return PublicNorms(torch.cat(blocks), torch.cat(feats))


def public_span_bounds(model: nn.Module, batches: Iterable, spans: Sequence[Span],
                       priors: Mapping[str, Mapping[Span, LinearMap]], token_mode: str, scale: float
                       ) -> dict[str, dict[Span, SpanBounds]]:
    """Per-image statistic bounds of each span of each kind in `priors` (kind -> span -> prior; ``map: auto``: both):
    `scale` × their medians on public images (pass crops the priors were not fitted on, so residuals are not
    optimistically small). The norms are those of the (input, target) pairs the sites clip
    (`ViTAdapter.kind_span_pairs`, one forward for every kind), each kind's residuals around its own prior."""
    adapter = ViTAdapter(model)
    norms: dict[str, dict[Span, dict[str, list[torch.Tensor]]]] = {
        kind: {s: {k: [] for k in STATISTICS} for s in spans} for kind in priors}
    with torch.inference_mode():
        for images, _ in batches:
            for kind, pairs in adapter.kind_span_pairs(images, spans, tuple(priors), token_mode).items():
                for span, (x, y) in pairs.items():
                    x, y = x.double(), y.double()
                    for k, v in image_norms(x, residual(x, y, priors[kind][span])).items():
                        norms[kind][span][k].append(v)
    return {kind: {span: SpanBounds(*(float(torch.cat(per_span[span][k]).median()) * scale for k in STATISTICS))
                   for span in spans} for kind, per_span in norms.items()}


def public_prior_maps(model: nn.Module, batches: Iterable, spans: Sequence[Span], token_mode: str,
                      bias: bool, kinds: Sequence[str] = ("linear",)) -> dict[str, dict[Span, LinearMap]]:
    """Each span's map of each kind in `kinds` (`collected_kinds` of the run's map) fitted on public images, from
    one pass: the prior P that private statistics refine, each kind's on its own (input, target) pairs, the same
    as the sites' statistics of that kind."""
    stats = collect_kind_stats(ViTAdapter(model), batches, spans, kinds, token_mode=token_mode)
    maps = {kind: {span: solve_span(s, bias=bias, ridge=PRIOR_RIDGE)[0] for span, s in per_span.items()}
            for kind, per_span in stats.items()}
    _logger.info("public prior (%s) fitted for %s on %d images", ", ".join(kinds), ", ".join(map(str, spans)),
                 stats[kinds[0]][spans[0]].images)
    return maps
