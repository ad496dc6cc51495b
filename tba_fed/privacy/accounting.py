"""One noise multiplier for a whole run, from Opacus' accountants.

Every release in a run (similarity, statistics, probe, accuracy) is a Gaussian mechanism on the full
data of a site (sampling rate 1) with noise std = σ × its L2 sensitivity, so a run of k releases is k
steps of the accountant at q = 1. Ledgers compose runs the same way: their histories are replayed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from ..errors import TBAInputError

# At q = 1 the RDP of a Gaussian mechanism is α/(2σ²): the best order grows with σ, so the default
# orders (up to 63) are too short for strong privacy. Orders up to 10⁴ cover σ of several hundred.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64))
                                      + [64 * 1.25**k for k in range(1, 32)])
ACCOUNTANTS = ("rdp", "prv")


def _check(epsilon: float, delta: float, releases: int, accountant: str) -> None:
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise TBAInputError("privacy.epsilon", f"must be a positive finite number, got {epsilon}")
    if not 0 < delta < 1:
        raise TBAInputError("privacy.delta", f"must lie in (0, 1), got {delta}")
    if releases < 1:
        raise TBAInputError("privacy.releases", f"a run makes at least one release, got {releases}")
    if accountant not in ACCOUNTANTS:
        raise TBAInputError("privacy.accountant", f"unknown accountant {accountant!r}", f"use one of {', '.join(ACCOUNTANTS)}")


def noise_multiplier(epsilon: float, delta: float, releases: int, accountant: str = "rdp") -> float:
    """The σ whose composition over `releases` Gaussian releases spends at most (ε, δ)."""
    _check(epsilon, delta, releases, accountant)
    kwargs = {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about optimal orders at the edge; ours are wide
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0,
                                          steps=releases, accountant=accountant, epsilon_tolerance=0.005 * epsilon, **kwargs))


def epsilon_spent(history: Iterable[tuple[float, int]], delta: float, accountant: str = "rdp") -> float:
    """ε at `delta` of a sequence of (noise multiplier, releases) entries, composed by the accountant."""
    history = [(float(sigma), int(steps)) for sigma, steps in history]
    if not history:
        return 0.0
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(sigma, 1.0, steps) for sigma, steps in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if accountant == "rdp":
            return float(acc.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))
        return float(acc.get_epsilon(delta=delta))


def replace_one_epsilon(history: Iterable[tuple[float, int]], delta: float, accountant: str = "rdp") -> float:
    """ε of the same releases under replace-one-image adjacency, for reports that must not let the two be confused.

    Every guarantee tba-fed states is under add/remove-one-image adjacency. Replacing an image can move
    each clipped sum by twice its per-image bound (out with one, in with the other), so the same noise
    is then a Gaussian mechanism with noise multiplier σ/2 (a conservative bound: counts move by 1, not 2).
    """
    return epsilon_spent([(float(sigma) / 2, int(steps)) for sigma, steps in history], delta, accountant)
