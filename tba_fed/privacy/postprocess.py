"""What the server does with noisy sums before solving: free post-processing, no privacy cost.

The noisy Gram is projected onto the PSD cone, and the ridge follows AdaSSP (Wang 2018): it is
the high-probability bound on the spectral norm of the Gram noise minus a conservative private
estimate of the smallest eigenvalue, so a well-conditioned Gram gets little shrinkage and a
near-singular one gets just enough. The estimate is read off the released noisy Gram itself
(post-processing), so unlike the original AdaSSP no budget is spent on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..stats import SpanStats

FAILURE_PROBABILITY = 0.05  # AdaSSP's ρ: the noise bound holds with probability 1 − ρ


def psd_projection(gram: torch.Tensor) -> torch.Tensor:
    """Nearest PSD matrix in Frobenius norm: negative eigenvalues set to zero."""
    sym = (gram + gram.T) / 2
    eigvals, eigvecs = torch.linalg.eigh(sym)
    return (eigvecs * eigvals.clamp_min(0.0)) @ eigvecs.T


def gram_noise_bound(dim: int, std: float, rho: float = FAILURE_PROBABILITY) -> float:
    """‖E‖₂ ≤ std (2√d + 2√log(1/ρ)) with probability ≥ 1 − ρ for symmetric E with N(0, std²) entries."""
    return std * (2 * math.sqrt(dim) + 2 * math.sqrt(math.log(1 / rho)))


@dataclass(frozen=True)
class RidgeChoice:
    ridge_lambda: float
    noise_bound: float
    min_eigenvalue_estimate: float


def adassp_ridge(noisy_gram: torch.Tensor, gram_noise_std: float) -> RidgeChoice:
    """λ = max(0, b − λ̂_min) with b the noise bound and λ̂_min = max(λ_min(G̃) − b, 0) (Weyl)."""
    bound = gram_noise_bound(noisy_gram.shape[0], gram_noise_std)
    smallest = float(torch.linalg.eigvalsh((noisy_gram + noisy_gram.T) / 2)[0])
    estimate = max(smallest - bound, 0.0)
    return RidgeChoice(max(0.0, bound - estimate), bound, estimate)


def centered_gram(stats: SpanStats) -> torch.Tensor:
    """G − Σx Σxᵀ / n: the Gram the weight sees once an unpenalised bias absorbs the means."""
    return stats.gram if stats.tokens <= 0 else stats.gram - torch.outer(stats.sum_x, stats.sum_x) / stats.tokens


def clean_stats(stats: SpanStats, *, bias: bool) -> SpanStats:
    """The same sums with the Gram projected onto the PSD cone.

    With a bias the centred Gram is projected (and the means added back), so the augmented system
    [[G, Σx], [Σxᵀ, n]] is PSD as well: its Schur complement is the projected centred Gram.
    """
    if not bias:
        return replace(stats, gram=psd_projection(stats.gram))
    centred = centered_gram(stats)
    return replace(stats, gram=psd_projection(centred) + (stats.gram - centred))
