"""Mergeable float64 sufficient statistics: the contract between sites and the server.

Everything TBA needs is a sum over images, so each accumulator supports ``update`` (stream a
batch), ``+`` (merge two disjoint sets of images) and ``to_arrays``/``from_arrays`` (plain numpy
arrays, what a site sends). Merging any split of the data gives the same sums as one pass, which is
why the federated path reproduces the centralised one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from .errors import TBAInputError

Arrays = dict[str, np.ndarray]
SIMILARITY_METRICS: tuple[str, ...] = ("mse", "cosine", "angular")
# Larger entries are refused: the product of two of them (Gram times map, sums of squares) must stay finite in float64.
MAX_MAGNITUDE = 1e150
_COUNTS: dict[str, tuple[int, ...]] = {"tokens": (), "images": ()}  # every accumulator's two counts, scalars


def check_arrays(arrays: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], kind: str) -> None:
    """Reject a payload whose keys, shapes, dtypes or values are not what `kind` expects."""
    missing = sorted(set(shapes) - set(arrays))
    extra = sorted(set(arrays) - set(shapes))
    if missing or extra:
        raise TBAInputError(kind, f"missing keys {missing[:4]}{'…' * (len(missing) > 4)}, "
                                  f"unexpected keys {extra[:4]}{'…' * (len(extra) > 4)}")
    for key, shape in shapes.items():
        value = np.asarray(arrays[key])
        if value.dtype != np.float64:
            raise TBAInputError(f"{kind}.{key}", f"dtype {value.dtype}, expected float64")
        if value.shape != shape:
            raise TBAInputError(f"{kind}.{key}", f"shape {value.shape}, expected {shape}")
        if not np.isfinite(value).all():
            raise TBAInputError(f"{kind}.{key}", "contains NaN or Inf")
        if value.size and float(np.abs(value).max()) > MAX_MAGNITUDE:
            raise TBAInputError(f"{kind}.{key}", f"entry of magnitude {float(np.abs(value).max()):.3g} exceeds "
                                                 f"{MAX_MAGNITUDE:g}: no sum of real activations is that large")


def vector_length(arrays: Mapping[str, Any], key: str, kind: str) -> int:
    """Length of the vector that sizes a payload; 0 when it is absent (check_arrays then names it missing)."""
    if key not in arrays:
        return 0
    shape = np.shape(arrays[key])
    if len(shape) != 1:
        raise TBAInputError(f"{kind}.{key}", f"shape {shape}, expected a vector")
    return int(shape[0])


def check_counts(arrays: Mapping[str, Any], keys: Sequence[str], kind: str) -> None:
    """Counts (one number each, already checked finite) must be non-negative integers."""
    for key in keys:
        count = float(np.asarray(arrays[key]).item())
        if count < 0 or count != math.floor(count):
            raise TBAInputError(f"{kind}.{key}", f"count {count} is not a non-negative integer")


def _as_float64(x: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise TBAInputError("activations", f"{what} contains NaN or Inf", "check the model weights and input images")
    return x.detach().to(torch.float64)


def finite_images(tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """The images (dim 0) whose values are finite in every tensor, and how many were left out.

    Each image is kept or left out on its own values alone, so adding or removing one image changes
    nothing but its own contribution (record-level DP), and one NaN or ±inf image cannot turn a whole
    release into NaN. When every image is finite the tensors come back untouched.
    """
    keep = torch.stack([torch.isfinite(x).reshape(len(x), -1).all(dim=1).cpu() for x in tensors]).all(dim=0)
    left_out = int((~keep).sum())
    return (list(tensors) if left_out == 0 else [x[keep.to(x.device)] for x in tensors]), left_out


@dataclass
class _Accumulator:
    """Shared merge/serialise logic; subclasses declare float64 tensor fields plus two counts."""

    tokens: int
    images: int

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in fields(self) if f.name not in _COUNTS]

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(getattr(self, name).shape) for name in self._tensor_fields()} | _COUNTS

    def __add__(self, other: Any) -> Any:
        if not isinstance(other, type(self)):
            return NotImplemented
        if self._shapes() != other._shapes():
            raise TBAInputError(type(self).__name__, f"cannot merge shapes {self._shapes()} and {other._shapes()}")
        merged = {name: getattr(self, name) + getattr(other, name) for name in self._tensor_fields()}
        return type(self)(tokens=self.tokens + other.tokens, images=self.images + other.images, **merged)

    def __radd__(self, other: Any) -> Any:
        return self if other == 0 else self.__add__(other)

    def to_arrays(self) -> Arrays:
        tensors = {name: getattr(self, name).detach().cpu().numpy().copy() for name in self._tensor_fields()}
        return tensors | {name: np.asarray(float(getattr(self, name))) for name in _COUNTS}

    @classmethod
    def _from_checked(cls, arrays: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]) -> Any:
        """`tensor_shapes`: the subclass's tensor fields; the two counts are checked here."""
        check_arrays(arrays, {**tensor_shapes, **_COUNTS}, cls.__name__)
        check_counts(arrays, tuple(_COUNTS), cls.__name__)
        tensors = {k: torch.from_numpy(np.array(arrays[k], dtype=np.float64)) for k in tensor_shapes}
        return cls(tokens=int(arrays["tokens"]), images=int(arrays["images"]), **tensors)


@dataclass
class SimilarityStats(_Accumulator):
    """Pairwise sums over tokens between the outputs of blocks 0..L-1 (entries a < b are used).

    From these sums: the normalised MSE of the pair (a, b) is Σ‖x_b − x_a‖² / Σ‖x_b‖², the relative
    error of simply dropping blocks a+1..b (scale-free, so models are comparable); cosine distance is
    1 − mean token cosine (ShortGPT); angular distance is mean arccos(cos)/π (ReplaceMe).
    """

    sq_dist: torch.Tensor
    cos_sum: torch.Tensor
    angle_sum: torch.Tensor
    sq_norm: torch.Tensor

    @classmethod
    def zeros(cls, num_blocks: int) -> SimilarityStats:
        z = lambda: torch.zeros(num_blocks, num_blocks, dtype=torch.float64)  # noqa: E731
        return cls(tokens=0, images=0, sq_dist=z(), cos_sum=z(), angle_sum=z(),
                   sq_norm=torch.zeros(num_blocks, dtype=torch.float64))

    @property
    def num_blocks(self) -> int:
        return int(self.sq_norm.shape[0])

    def update(self, outputs: Sequence[torch.Tensor], images: int) -> None:
        """Add one batch: ``outputs[k]`` holds block k's selected token rows, [rows, dim]."""
        if len(outputs) != self.num_blocks:
            raise TBAInputError("outputs", f"got {len(outputs)} block outputs, expected {self.num_blocks}")
        xs = [_as_float64(x, f"block {k} output") for k, x in enumerate(outputs)]
        norms = [x.norm(dim=1) for x in xs]
        for b, xb in enumerate(xs):
            self.sq_norm[b] += norms[b].square().sum()
            for a in range(b):
                cos = ((xs[a] * xb).sum(dim=1) / (norms[a] * norms[b]).clamp_min(1e-300)).clamp(-1.0, 1.0)
                self.sq_dist[a, b] += (xb - xs[a]).square().sum()
                self.cos_sum[a, b] += cos.sum()
                self.angle_sum[a, b] += torch.arccos(cos).sum() / math.pi
        self.tokens += int(xs[0].shape[0])
        self.images += images

    def metric(self, name: str = "mse") -> np.ndarray:
        """[L, L] matrix of a similarity cost, meaningful for a < b (NaN elsewhere)."""
        if self.tokens == 0:
            raise TBAInputError("data", "no images were accumulated", "check the calibration data")
        upper = np.triu(np.ones((self.num_blocks, self.num_blocks), dtype=bool), k=1)
        if name == "mse":
            values = self.sq_dist / self.sq_norm.clamp_min(1e-300)[None, :]
        elif name == "cosine":
            values = 1.0 - self.cos_sum / self.tokens
        elif name == "angular":
            values = self.angle_sum / self.tokens
        else:
            raise TBAInputError("metric", f"unknown similarity metric {name!r}", f"use one of {', '.join(SIMILARITY_METRICS)}")
        return np.where(upper, values.numpy(), np.nan)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> SimilarityStats:
        num_blocks = vector_length(arrays, "sq_norm", cls.__name__)
        square = (num_blocks, num_blocks)
        return cls._from_checked(arrays, {"sq_dist": square, "cos_sum": square, "angle_sum": square,
                                          "sq_norm": (num_blocks,)})


@dataclass
class SpanStats(_Accumulator):
    """Least-squares sums for one span s->e: G = Σ x_s x_sᵀ, C = Σ x_s x_eᵀ, Σx_s, Σx_e, Σ‖x_e‖².

    With the token count they determine the affine fit, its residual and the identity skip's
    residual, so no activation ever has to leave the place it was computed.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    sum_x: torch.Tensor
    sum_y: torch.Tensor
    sum_yy: torch.Tensor

    @classmethod
    def zeros(cls, dim: int) -> SpanStats:
        return cls(tokens=0, images=0,
                   gram=torch.zeros(dim, dim, dtype=torch.float64), cross=torch.zeros(dim, dim, dtype=torch.float64),
                   sum_x=torch.zeros(dim, dtype=torch.float64), sum_y=torch.zeros(dim, dtype=torch.float64),
                   sum_yy=torch.zeros((), dtype=torch.float64))

    @property
    def dim(self) -> int:
        return int(self.sum_x.shape[0])

    def update(self, x: torch.Tensor, y: torch.Tensor, images: int) -> None:
        """Add rows x (block s output) and y (block e output), both [rows, dim]."""
        if x.shape != y.shape or x.ndim != 2 or x.shape[1] != self.dim:
            raise TBAInputError("activations", f"shapes {tuple(x.shape)} and {tuple(y.shape)} do not match dim {self.dim}")
        x64, y64 = _as_float64(x, "span input"), _as_float64(y, "span target")
        self.gram += x64.T @ x64
        self.cross += x64.T @ y64
        self.sum_x += x64.sum(dim=0)
        self.sum_y += y64.sum(dim=0)
        self.sum_yy += y64.square().sum()
        self.tokens += int(x64.shape[0])
        self.images += images

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> SpanStats:
        dim = vector_length(arrays, "sum_x", cls.__name__)
        return cls._from_checked(arrays, {"gram": (dim, dim), "cross": (dim, dim), "sum_x": (dim,), "sum_y": (dim,),
                                          "sum_yy": ()})
