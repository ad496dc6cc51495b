"""The Gaussian mechanism's noise: cryptographically secure by default, seeded only for tests.

Secure mode takes the two measures Opacus' ``secure_mode`` takes: draws come from the operating
system's CSPRNG (``os.urandom``), never from a seedable generator, and each released value is the
sum of four Gaussian draws scaled by 1/2 (same variance), which closes the floating-point attack on
textbook Gaussian samplers (Mironov 2012; Holohan & Braghin 2021) in the way Opacus does.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from ..errors import TBAInputError

_logger = logging.getLogger(__name__)
_DRAWS = 4  # Opacus secure_mode: n = 2, sum of n² draws divided by n


def describe_noise(seed: int | None) -> str:
    """How noise is drawn, as ledgers and reports state it."""
    return "secure (CSPRNG, sum of 4 Gaussian draws)" if seed is None else f"seeded ({seed}): tests only, NOT private"


class NoiseSource:
    """Gaussian noise for releases. ``NoiseSource.secure()`` in deployments, ``NoiseSource.seeded(s)`` in tests."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._rng = None if seed is None else np.random.default_rng(seed)

    @classmethod
    def secure(cls) -> NoiseSource:
        return cls(None)

    @classmethod
    def seeded(cls, seed: int) -> NoiseSource:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TBAInputError("privacy.seed", f"must be an integer, got {seed!r}")
        _logger.warning("seeded noise (seed %d): reproducible, NOT for real privacy; use secure mode in deployments", seed)
        return cls(seed)

    @property
    def is_secure(self) -> bool:
        return self._rng is None

    @property
    def mode(self) -> str:
        return describe_noise(self.seed)

    def _standard_normal(self, size: int) -> np.ndarray:
        if self._rng is not None:
            return self._rng.standard_normal(size)
        # Box-Muller on 53-bit uniforms from the OS CSPRNG; u1 in (0, 1] keeps log finite.
        count = (size + 1) // 2
        bits = np.frombuffer(os.urandom(16 * count), dtype=np.uint64) >> np.uint64(11)
        uniform = bits.astype(np.float64) * 2.0**-53
        u1, u2 = 1.0 - uniform[:count], uniform[count:]
        radius = np.sqrt(-2.0 * np.log(u1))
        return np.concatenate([radius * np.cos(2 * math.pi * u2), radius * np.sin(2 * math.pi * u2)])[:size]

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        """i.i.d. N(0, std²) of `shape` (float64)."""
        if not (std >= 0 and math.isfinite(std)):
            raise TBAInputError("privacy.noise", f"noise std must be finite and >= 0, got {std}")
        size = int(np.prod(shape, dtype=np.int64))
        if self._rng is not None:
            return np.asarray(std * self._standard_normal(size)).reshape(shape)
        total = sum(self._standard_normal(size) for _ in range(_DRAWS))
        return np.asarray(std * total / math.sqrt(_DRAWS)).reshape(shape)

    def symmetric(self, dim: int, std: float) -> np.ndarray:
        """A symmetric matrix whose upper triangle (diagonal included) is i.i.d. N(0, std²).

        The mechanism releases the upper triangle, whose L2 sensitivity is at most the Frobenius
        sensitivity of the matrix; mirroring it is post-processing.
        """
        upper = np.triu_indices(dim)
        noise = np.zeros((dim, dim))
        noise[upper] = self.normal((len(upper[0]),), std)
        return np.triu(noise) + np.triu(noise, 1).T
