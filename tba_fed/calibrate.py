"""Streaming passes of the frozen model that fill the accumulators.

Memory depends on the batch size, never on the number of images; the forward stops after the
last block that a computation needs. An image with a NaN or ±inf among the values a pass reads is
left out of its sums and counts (`stats.finite_images`); the site's log counts them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .adapter import ViTAdapter, check_map_kind
from .errors import TBAInputError
from .plan import Span
from .stats import SimilarityStats, SpanStats, finite_images

_logger = logging.getLogger(__name__)


def _images(batches: Iterable, adapter: ViTAdapter, device: torch.device, desc: str) -> Iterator[torch.Tensor]:
    dtype = next(adapter.model.parameters()).dtype
    seen = 0
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=None):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise TBAInputError("data", "batches must be image tensors [batch, channels, height, width]")
        seen += images.shape[0]
        yield images.to(device=device, dtype=dtype)
    if seen == 0:
        raise TBAInputError("data", "no images", "check the data source and the calibration split")


def _end_of_pass(desc: str, left_out: int, kept: int) -> None:
    """One local warning per pass that left images out (a count only); a pass that kept none has no images."""
    if left_out:
        _logger.warning("%s: left out %d image(s) with non-finite activations", desc, left_out)
    if kept == 0:
        raise TBAInputError("data", "no images with finite activations", "check the model weights and input images")


def collect_similarity(adapter: ViTAdapter, batches: Iterable, *, token_mode: str = "all",
                       device: str | torch.device = "cpu",
                       transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> SimilarityStats:
    """One pass over all blocks: pairwise similarity sums of every block pair.

    `transform(b, tokens)` may rewrite block b's tokens [images, tokens, dim] before they are summed: a private
    release bounds each image's contribution that way (`privacy.passes`), so this pass knows nothing of privacy.
    """
    adapter.check_token_mode(token_mode)
    stats = SimilarityStats.zeros(adapter.num_blocks)
    left_out = 0
    adapter.model.to(device)
    with torch.inference_mode():
        for images in _images(batches, adapter, torch.device(device), "similarity"):
            outputs, dropped = finite_images([adapter.image_tokens(x, token_mode) for x in
                                              adapter.iter_block_outputs(images, adapter.num_blocks - 1)])
            left_out += dropped
            if transform is not None:
                outputs = [transform(block, x) for block, x in enumerate(outputs)]
            stats.update([x.reshape(-1, x.shape[-1]) for x in outputs], images=outputs[0].shape[0])
    _end_of_pass("similarity", left_out, stats.images)
    return stats


def span_pairs(adapter: ViTAdapter, batches: Iterable, spans: Sequence[Span], token_mode: str,
               device: str | torch.device, map_kind: str = "linear") -> Iterator[dict[Span, tuple[torch.Tensor, torch.Tensor]]]:
    """Per batch, every span's (input, target) pair of selected tokens per image [images, tokens, dim]
    (`ViTAdapter.span_pairs`: x_s, x_e for a linear map; m_s, x_e − h_s for a folded one), without the
    images that have a non-finite value in any of them; the forward stops after the last block a span
    reads. Callers hold the inference mode."""
    check_map_kind(map_kind)
    for pairs in kind_span_pairs(adapter, batches, spans, token_mode, device, (map_kind,)):
        yield pairs[map_kind]


def kind_span_pairs(adapter: ViTAdapter, batches: Iterable, spans: Sequence[Span], token_mode: str,
                    device: str | torch.device, kinds: Sequence[str]
                    ) -> Iterator[dict[str, dict[Span, tuple[torch.Tensor, torch.Tensor]]]]:
    """`span_pairs` of several kinds from one forward per batch (`ViTAdapter.kind_span_pairs`); an image is
    left out of every kind's pairs if any of them holds a non-finite value, so all kinds sum the same images."""
    if not spans:
        raise TBAInputError("plan", "no spans to calibrate")
    adapter.check_token_mode(token_mode)
    for kind in kinds:
        check_map_kind(kind)
    adapter.model.to(device)
    kept = left_out = 0
    for images in _images(batches, adapter, torch.device(device), "statistics"):
        pairs = adapter.kind_span_pairs(images, spans, kinds, token_mode)
        order = [(kind, span) for kind in kinds for span in pairs[kind]]
        finite, dropped = finite_images([t for kind, span in order for t in pairs[kind][span]])
        kept, left_out = kept + len(finite[0]), left_out + dropped
        out: dict[str, dict[Span, tuple[torch.Tensor, torch.Tensor]]] = {kind: {} for kind in kinds}
        for i, (kind, span) in enumerate(order):
            out[kind][span] = (finite[2 * i], finite[2 * i + 1])
        yield out
    _end_of_pass("statistics", left_out, kept)


def collect_span_stats(adapter: ViTAdapter, batches: Iterable, spans: Sequence[Span], *, token_mode: str = "all",
                       device: str | torch.device = "cpu", map_kind: str = "linear") -> dict[Span, SpanStats]:
    """One pass up to the last needed block: G, C and sums of every span's (input, target) pair at once."""
    check_map_kind(map_kind)
    return collect_kind_stats(adapter, batches, spans, (map_kind,), token_mode=token_mode, device=device)[map_kind]


def collect_kind_stats(adapter: ViTAdapter, batches: Iterable, spans: Sequence[Span], kinds: Sequence[str], *,
                       token_mode: str = "all", device: str | torch.device = "cpu") -> dict[str, dict[Span, SpanStats]]:
    """`collect_span_stats` of every kind in `kinds` from the same single pass (``map: auto`` collects both)."""
    stats = {kind: {span: SpanStats.zeros(adapter.embed_dim) for span in spans} for kind in kinds}
    with torch.inference_mode():
        for pairs in kind_span_pairs(adapter, batches, spans, token_mode, device, kinds):
            for kind, per_span in stats.items():
                for span, acc in per_span.items():
                    x, y = pairs[kind][span]
                    acc.update(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), images=x.shape[0])
    return stats
