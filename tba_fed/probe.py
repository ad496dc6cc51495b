"""A linear classifier on frozen features, fitted in closed form from mergeable sums.

The paper evaluates a compressed ViT with a linear head on its final-norm class token. A ridge
least-squares head onto one-hot labels needs only Σffᵀ, Σfyᵀ, Σf and class counts, so sites can fit
it together exactly as they fit the maps. (The paper trains its head with Adam; numbers from this
head are labelled "closed-form ridge probe".)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import TBAInputError
from .stats import SpanStats, _Accumulator, _as_float64, finite_images, vector_length
from .solver import solve_span

_logger = logging.getLogger(__name__)


def features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """timm's pre-logits representation: the final-norm class token for token-pooling ViTs."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


@dataclass
class ProbeStats(_Accumulator):
    """Σ f fᵀ, Σ f yᵀ (y one-hot), Σ f and per-class counts over images (tokens = images here)."""

    gram: torch.Tensor
    cross: torch.Tensor
    sum_f: torch.Tensor
    class_counts: torch.Tensor

    @classmethod
    def zeros(cls, dim: int, num_classes: int) -> ProbeStats:
        return cls(tokens=0, images=0, gram=torch.zeros(dim, dim, dtype=torch.float64),
                   cross=torch.zeros(dim, num_classes, dtype=torch.float64),
                   sum_f=torch.zeros(dim, dtype=torch.float64), class_counts=torch.zeros(num_classes, dtype=torch.float64))

    @property
    def num_classes(self) -> int:
        return int(self.class_counts.shape[0])

    def update(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        labels = torch.as_tensor(labels).long().cpu()
        if labels.ndim != 1 or len(labels) != len(feats):
            raise TBAInputError("labels", f"expected {len(feats)} integer labels, got shape {tuple(labels.shape)}")
        if len(labels) and labels.min() < 0:  # data.UNLABELED: a flat image folder
            raise TBAInputError("data.path", "the images have no labels (a flat folder without class sub-folders): "
                                             "calibration needs none, the probe's accuracy does",
                                "put the images in one sub-folder per class to measure accuracy")
        if len(labels) and labels.max() >= self.num_classes:
            raise TBAInputError("labels", f"labels must lie in [0, {self.num_classes}), got "
                                          f"{int(labels.min())}..{int(labels.max())}", "set num_classes")
        f = _as_float64(feats, "probe features").cpu()
        onehot = nn.functional.one_hot(labels, self.num_classes).to(torch.float64)
        self.gram += f.T @ f
        self.cross += f.T @ onehot
        self.sum_f += f.sum(dim=0)
        self.class_counts += onehot.sum(dim=0)
        self.tokens += len(labels)
        self.images += len(labels)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> ProbeStats:
        dim, k = vector_length(arrays, "sum_f", cls.__name__), vector_length(arrays, "class_counts", cls.__name__)
        return cls._from_checked(arrays, {"gram": (dim, dim), "cross": (dim, k), "sum_f": (dim,), "class_counts": (k,)})


@dataclass(frozen=True)
class ProbeHead:
    """logits = f @ weight.T + bias (float64)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.to(torch.float64) @ self.weight.T + self.bias

    def predict(self, feats: torch.Tensor) -> torch.Tensor:
        return self.logits(feats).argmax(dim=1)


def solve_probe(stats: ProbeStats, *, ridge: float = 1e-6) -> ProbeHead:
    """Affine ridge least squares onto one-hot labels; ridge relative to tr(Σffᵀ)/d, bias unpenalised.

    It is the span solver's problem with the one-hot labels as targets, so it reuses that solver
    (Cholesky, singular fallback) rather than a second copy of it.
    """
    if stats.images == 0:
        raise TBAInputError("data", "no images in the probe statistics")
    as_span = SpanStats(tokens=stats.tokens, images=stats.images, gram=stats.gram, cross=stats.cross,
                        sum_x=stats.sum_f, sum_y=stats.class_counts, sum_yy=stats.class_counts.sum())
    linear_map, _ = solve_span(as_span, bias=True, ridge=ridge)
    return ProbeHead(linear_map.weight, linear_map.bias)


def _finite_features(model: nn.Module, batches: Iterable, device: str | torch.device,
                     desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per labelled batch, features and labels of the images with finite features; callers hold the inference mode."""
    left_out = 0
    dtype = next(model.parameters()).dtype
    model.to(device).eval()
    for images, labels in tqdm(batches, desc=desc, unit="batch", leave=False, disable=None):
        (feats, labels), dropped = finite_images([features(model, images.to(device=device, dtype=dtype)),
                                                  torch.as_tensor(labels)])
        left_out += dropped
        yield feats, labels
    if left_out:
        _logger.warning("%s: left out %d image(s) with non-finite activations", desc, left_out)


def collect_probe_stats(model: nn.Module, batches: Iterable, num_classes: int, *,
                        device: str | torch.device = "cpu",
                        transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ProbeStats:
    """Stream labelled batches through the frozen model and sum the probe statistics.

    `transform(features)` may rewrite the features [images, dim] before they are summed: a private release
    bounds each image's feature vector that way (`privacy.passes`). Images with a non-finite feature are
    left out (`stats.finite_images`) and counted in the log.
    """
    stats: ProbeStats | None = None
    with torch.inference_mode():
        for feats, labels in _finite_features(model, batches, device, "probe"):
            if transform is not None:
                feats = transform(feats)
            if stats is None:
                stats = ProbeStats.zeros(feats.shape[1], num_classes)
            stats.update(feats, labels)
    if stats is None or stats.images == 0:
        raise TBAInputError("data", "no labelled images for the probe", "check the probe's data split")
    return stats


def accuracy(model: nn.Module, head: ProbeHead, batches: Iterable, *, device: str | torch.device = "cpu") -> tuple[int, int]:
    """(correct, total) as integers, so sites can report them and a server can pool them.

    Images with a non-finite feature are left out of both counts (`stats.finite_images`) and counted in the log.
    """
    correct = total = 0
    with torch.inference_mode():
        for feats, labels in _finite_features(model, batches, device, "accuracy"):
            correct += int((head.predict(feats.cpu()) == labels.cpu()).sum())
            total += len(labels)
    return correct, total
