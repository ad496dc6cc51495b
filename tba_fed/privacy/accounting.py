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
# A run spends at most ε = 100: there is no privacy to speak of beyond it, and the accountants' σ search
# breaks down (PRV fails, or exhausts memory, when it probes σ below about 0.03).
MAX_RUN_EPSILON = 100.0
# Every σ tba-fed derives (ε ≤ 100 gives σ ≥ 0.09) or reads from a ledger lies in this range, where both
# accountants compose it, halved too (replace-one reports): a forged σ of 1e-300 or 1e300 is refused.
MIN_NOISE_MULTIPLIER = 0.06
MAX_NOISE_MULTIPLIER = 1e6


def _check(epsilon: float, delta: float, releases: int, accountant: str) -> None:
    if not 0 < epsilon <= MAX_RUN_EPSILON:
        raise TBAInputError("privacy.epsilon", f"must lie in (0, {MAX_RUN_EPSILON:g}], got {epsilon}")
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
        try:
            sigma = float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0,
                                               steps=releases, accountant=accountant,
                                               epsilon_tolerance=0.005 * epsilon, **kwargs))
        except ValueError:  # Opacus: "the privacy budget is too low"
            sigma = math.inf
    if not MIN_NOISE_MULTIPLIER <= sigma <= MAX_NOISE_MULTIPLIER:
        raise TBAInputError("privacy.epsilon", f"ε={epsilon:g} at δ={delta:g} over {releases} release(s) needs σ="
                                               f"{sigma:.3g}, outside the range [{MIN_NOISE_MULTIPLIER:g}, "
                                               f"{MAX_NOISE_MULTIPLIER:g}] the accountants compose reliably",
                            "ask for a larger ε")
    return sigma


def epsilon_spent(history: Iterable[tuple[float, int]], delta: float, accountant: str = "rdp") -> float:
    """ε at `delta` of a sequence of (noise multiplier, releases) entries, composed by the accountant."""
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(float(sigma), 1.0, int(steps)) for sigma, steps in history]
    if not acc.history:
        return 0.0
    kwargs = {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta, **kwargs))


def replace_one_epsilon(history: Iterable[tuple[float, int]], delta: float, accountant: str = "rdp") -> float:
    """ε of the same releases under replace-one-image adjacency, for reports that must not let the two be confused.

    Every guarantee tba-fed states is under add/remove-one-image adjacency. Replacing an image can move
    each clipped sum by twice its per-image bound (out with one, in with the other), so the same noise
    is then a Gaussian mechanism with noise multiplier σ/2 (a conservative bound: counts move by 1, not 2).
    """
    return epsilon_spent([(float(sigma) / 2, int(steps)) for sigma, steps in history], delta, accountant)
