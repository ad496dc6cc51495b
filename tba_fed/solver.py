"""Closed-form linear maps from merged span statistics, with diagnostics from the same sums.

The map is y ≈ x Wᵀ + b (``nn.Linear`` convention). With the bias, x is augmented by a constant 1,
so G and C gain a row/column of Σx, Σy and the count; the ridge never penalises the bias.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import TBAInputError
from .stats import SpanStats

_logger = logging.getLogger(__name__)

MapKind = Literal["linear", "folded", "identity"]


@dataclass(frozen=True)
class LinearMap:
    """y = x @ weight.T + bias, float64. ``kind='identity'`` means the blocks are simply dropped; ``'folded'``
    that the map was fitted on block s's MLP branch (m_s -> x_e − h_s) and is folded into that block's fc2."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    kind: MapKind = "linear"

    @classmethod
    def identity(cls, dim: int) -> LinearMap:
        return cls(torch.eye(dim, dtype=torch.float64), None, "identity")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


@dataclass(frozen=True)
class FitQuality:
    """Residual of a map on a set of statistics: Σ‖y − T(x)‖² relative to Σ‖y‖² and R². `estimate` is the residual
    as the sums give it, before `sse` clamps it at zero: negative only from noisy (private) sums, where it is still
    an unbiased estimate; comparing two noisy fits by it keeps their order where clamping would tie them at zero."""

    sse: float
    relative_error: float
    r2: float
    estimate: float


@dataclass(frozen=True)
class SolveDiagnostics:
    condition_number: float
    ridge_lambda: float
    method: Literal["cholesky", "pinv"]


def _augmented(stats: SpanStats, bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not bias:
        return stats.gram, stats.cross
    d = stats.dim
    gram = torch.empty(d + 1, d + 1, dtype=torch.float64)
    gram[:d, :d] = stats.gram
    gram[:d, d] = gram[d, :d] = stats.sum_x
    gram[d, d] = float(stats.tokens)
    cross = torch.cat([stats.cross, stats.sum_y[None, :]], dim=0)
    return gram, cross


def fit_quality(stats: SpanStats, linear_map: LinearMap) -> FitQuality:
    """Exact residual from the sums: Σ‖y‖² − 2 tr(WC) − 2 bᵀΣy + tr(W G Wᵀ) + 2 bᵀW Σx + n‖b‖²."""
    if stats.tokens == 0:
        raise TBAInputError("data", "no tokens in these statistics", "check the calibration or held-out split")
    w = linear_map.weight
    sse = stats.sum_yy - 2 * torch.sum(w * stats.cross.T) + torch.sum((w @ stats.gram) * w)
    if linear_map.bias is not None:
        b = linear_map.bias
        sse = sse - 2 * b @ stats.sum_y + 2 * b @ (w @ stats.sum_x) + stats.tokens * (b @ b)
    sse_value = max(float(sse), 0.0)
    total = float(stats.sum_yy - stats.sum_y @ stats.sum_y / stats.tokens)
    return FitQuality(
        sse=sse_value,
        relative_error=sse_value / max(float(stats.sum_yy), 1e-300),
        r2=1.0 - sse_value / max(total, 1e-300),
        estimate=float(sse),
    )


def solve_span(stats: SpanStats, *, bias: bool = False, ridge: float = 0.0, ridge_lambda: float | None = None,
               prior: LinearMap | None = None, shrink_bias: bool = False) -> tuple[LinearMap, SolveDiagnostics]:
    """Least squares T = (G + λI)⁻¹ (C + λP) with λ = ridge · tr(G)/d (or `ridge_lambda` itself).

    The ridge shrinks the map toward the prior P (default: zero); P = I means "drop the blocks",
    the natural prior on a residual stream. The bias is shrunk too (toward the prior's) only with
    `shrink_bias`, as private solves need: there the sums that fix the bias are noisy as well.

    Cholesky is used when G + λI is positive definite. When it is not (fewer tokens than
    dimensions, constant features, ridge 0), the minimum-norm solution G⁺C from an
    eigendecomposition is returned instead (eigenvalues at or below d·eps·λ_max count as zero, and a
    Gram with such an eigenvalue is treated as singular even if Cholesky happens to succeed), the
    fallback is logged and named in the diagnostics; a small ridge avoids it.
    """
    if ridge < 0 or (ridge_lambda is not None and not ridge_lambda >= 0):
        raise TBAInputError("ridge", f"must be >= 0, got {ridge if ridge_lambda is None else ridge_lambda}")
    if stats.tokens == 0:
        raise TBAInputError("data", "no calibration tokens", "check the calibration data")
    gram, cross = _augmented(stats, bias)
    d = stats.dim
    lam = ridge * float(torch.trace(stats.gram)) / d if ridge_lambda is None else float(ridge_lambda)
    shrunk = d + 1 if bias and shrink_bias else d
    if prior is not None:
        if prior.weight.shape != (d, d):
            raise TBAInputError("prior", f"prior map of shape {tuple(prior.weight.shape)} for dimension {d}")
        cross = cross.clone()
        cross[:d] += lam * prior.weight.T.to(torch.float64)
        if shrunk > d and prior.bias is not None:
            cross[d] += lam * prior.bias.to(torch.float64)
    reg = gram.clone()
    reg.diagonal()[:shrunk] += lam
    eigvals = torch.linalg.eigvalsh(reg)
    condition = float(eigvals[-1] / eigvals[0]) if eigvals[0] > 0 else float("inf")
    rtol = reg.shape[0] * torch.finfo(torch.float64).eps  # eigenvalues at or below rtol·λ_max count as zero
    chol, info = torch.linalg.cholesky_ex(reg)
    if float(eigvals[0]) > rtol * float(eigvals[-1]) and int(info) == 0:
        solution, method = torch.cholesky_solve(cross, chol), "cholesky"
    else:
        _logger.warning("Gram matrix is singular (condition %.3g): using the pseudo-inverse; "
                        "set a small ridge (e.g. 1e-6) to avoid this", condition)
        solution, method = torch.linalg.pinv(reg, hermitian=True, rtol=rtol) @ cross, "pinv"
    weight = solution[:d].T.contiguous()
    bias_vec = solution[d].contiguous() if bias else None
    return LinearMap(weight, bias_vec), SolveDiagnostics(condition, lam, method)
