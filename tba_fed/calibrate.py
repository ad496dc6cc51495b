"""Streaming passes of the frozen model that fill the accumulators.

Memory depends on the batch size, never on the number of images; the forward stops after the
last block that a computation needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .adapter import ViTAdapter
from .errors import TBAInputError
from .plan import Span
from .privacy.clipped import ClippedSpanSums, SpanBounds
from .privacy.sensitivity import clip_images
from .solver import LinearMap
from .stats import SimilarityStats, SpanStats


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


def collect_similarity(adapter: ViTAdapter, batches: Iterable, *, token_mode: str = "all",
                       device: str | torch.device = "cpu", clip: Sequence[float] | None = None) -> SimilarityStats:
    """One pass over all blocks: pairwise similarity sums of every block pair.

    `clip[b]` bounds each image's token matrix at block b (Frobenius) before it is summed.
    """
    adapter.check_token_mode(token_mode)
    if clip is not None and len(clip) != adapter.num_blocks:
        raise TBAInputError("privacy.clip", f"{len(clip)} clipping bounds for {adapter.num_blocks} blocks")
    stats = SimilarityStats.zeros(adapter.num_blocks)
    adapter.model.to(device)
    with torch.inference_mode():
        for images in _images(batches, adapter, torch.device(device), "similarity"):
            outputs = [adapter.image_tokens(x, token_mode) for x in
                       adapter.iter_block_outputs(images, adapter.num_blocks - 1)]
            if clip is not None:
                outputs = [clip_images(x, bound)[0] for x, bound in zip(outputs, clip)]
            stats.update([x.reshape(-1, x.shape[-1]) for x in outputs], images=images.shape[0])
    return stats


def _span_outputs(adapter: ViTAdapter, batches: Iterable, spans: Sequence[Span], token_mode: str,
                  device: str | torch.device) -> Iterator[dict[int, torch.Tensor]]:
    """Per batch, the selected tokens per image [images, tokens, dim] of every block a span reads;
    the forward stops after the last of them. Callers hold the inference mode."""
    if not spans:
        raise TBAInputError("plan", "no spans to calibrate")
    adapter.check_token_mode(token_mode)
    needed = {i for span in spans for i in (span.start, span.end)}
    adapter.model.to(device)
    for images in _images(batches, adapter, torch.device(device), "statistics"):
        yield {index: adapter.image_tokens(x, token_mode)
               for index, x in enumerate(adapter.iter_block_outputs(images, max(needed))) if index in needed}


def collect_span_stats(adapter: ViTAdapter, batches: Iterable, spans: Sequence[Span], *, token_mode: str = "all",
                       device: str | torch.device = "cpu") -> dict[Span, SpanStats]:
    """One pass up to the last needed block: G, C and sums for every span at once."""
    stats = {span: SpanStats.zeros(adapter.embed_dim) for span in spans}
    with torch.inference_mode():
        for kept in _span_outputs(adapter, batches, spans, token_mode, device):
            for span, acc in stats.items():
                x, y = kept[span.start], kept[span.end]
                acc.update(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), images=x.shape[0])
    return stats


def collect_clipped_span_sums(adapter: ViTAdapter, batches: Iterable, spans: Sequence[Span], *, token_mode: str,
                              bounds: Mapping[Span, SpanBounds], priors: Mapping[Span, LinearMap],
                              device: str | torch.device = "cpu") -> dict[Span, ClippedSpanSums]:
    """The same pass for a private release: weighted residual-form sums of every span (`privacy.clipped`)."""
    sums = {span: ClippedSpanSums.zeros(adapter.embed_dim) for span in spans}
    with torch.inference_mode():
        for kept in _span_outputs(adapter, batches, spans, token_mode, device):
            for span, acc in sums.items():
                acc.update(kept[span.start].cpu(), kept[span.end].cpu(), priors[span], bounds[span])
    return sums
