"""Canary audit: empirical lower bounds on ε stay below the claimed ε for the real span release, and
exceed it for releases with a known privacy bug (too little noise, a canary that moves a second record).

Every driver test uses the CSPRNG noise of deployments, so its outcome is random: each one states the
probability that it fails by chance, computed from its trial count, and keeps it below 1e-6.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import pytest
import torch
from opacus.accountants.analysis.gdp import eps_from_mu as opacus_eps_from_mu
from scipy import integrate, optimize
from scipy.stats import binom, binomtest, nct, norm

from tba_fed.plan import Span
from tba_fed.privacy.accounting import epsilon_spent, noise_multiplier
from tba_fed.privacy.clipped import STATISTICS, ClippedSpanSums, SpanBounds, image_norms, release_weights
from empirical import (THRESHOLD_OFFSETS, ProjectionTest, audit_release, clopper_pearson,
                                       delta_from_mu, epsilon_lower_bound, eps_from_mu,
                                       mu_confidence_interval)
from tba_fed.privacy.mechanism import NoiseSource
from tba_fed.privacy.release import noisy_spans
from tba_fed.privacy.sensitivity import span_parts
from tba_fed.solver import LinearMap

SPAN = Span(1, 3)
DIM, TOKENS = 8, 4  # 146 entries, 118 noised independently: the tests' power depends on μ, not on the size
DELTA = 1e-5
SURE = 1 - 1e-7  # confidence of the correct-mechanism checks (their false-alarm probability is computed)


# --- Clopper-Pearson and the ε bound of one test -------------------------------------------------

@pytest.mark.parametrize(("k", "n"), [(0, 10), (5, 10), (10, 10), (3, 1000), (997, 1000)])
def test_clopper_pearson_matches_scipy_exact_interval(k, n):
    assert clopper_pearson(k, n, 0.95) == pytest.approx(binomtest(k, n).proportion_ci(0.95, "exact"), abs=1e-9)
    assert clopper_pearson(k, n, 0.95, "upper") == pytest.approx(
        binomtest(k, n, alternative="less").proportion_ci(0.95, "exact"), abs=1e-9)


def test_clopper_pearson_textbook_values_and_edges():
    assert clopper_pearson(5, 10, 0.95) == pytest.approx((0.187086, 0.812914), abs=1e-6)  # standard table value
    # k = 0: the interval starts at 0 and its upper end solves (1 − p)^n = tail (the "rule of three" ≈ 3/n).
    assert clopper_pearson(0, 1000, 0.95, "upper") == pytest.approx((0.0, 1 - 0.05 ** (1 / 1000)), rel=1e-12)
    assert clopper_pearson(0, 1000, 0.95) == pytest.approx((0.0, 1 - 0.025 ** (1 / 1000)), rel=1e-12)
    # k = n: the interval ends at 1 and its lower end solves p^n = tail.
    assert clopper_pearson(1000, 1000, 0.95) == pytest.approx((0.025 ** (1 / 1000), 1.0), rel=1e-12)
    assert clopper_pearson(0, 0, 0.95) == (0.0, 1.0)
    with pytest.raises(ValueError):
        clopper_pearson(11, 10, 0.95)


def test_epsilon_lower_bound_from_error_rates():
    # No errors in 1000 + 1000 trials: both rates are at most 1 − 0.025^(1/1000) (one-sided 97.5% each).
    hi = 1 - 0.025 ** (1 / 1000)
    assert epsilon_lower_bound(0, 1000, 0, 1000, DELTA) == pytest.approx(math.log((1 - DELTA - hi) / hi), rel=1e-12)
    assert epsilon_lower_bound(0, 1000, 0, 1000, DELTA) == pytest.approx(5.60, abs=0.01)
    # Every guess wrong on one side: that side says nothing, and the other's rate bound alone cannot beat 1 − δ.
    assert epsilon_lower_bound(1000, 1000, 0, 1000, DELTA) == 0.0
    assert epsilon_lower_bound(500, 1000, 500, 1000, DELTA) == 0.0  # a coin toss
    # The two terms are symmetric in the two error rates.
    assert epsilon_lower_bound(20, 1000, 300, 1000, DELTA) == epsilon_lower_bound(300, 1000, 20, 1000, DELTA) > 0


# --- Gaussian DP ---------------------------------------------------------------------------------

def _hockey_stick(epsilon: float, mu: float) -> float:
    """δ(ε) = ∫ (p₁ − e^ε p₀)₊ for p₀ = N(0, 1), p₁ = N(μ, 1), integrated where p₁/p₀ > e^ε."""
    start = epsilon / mu + mu / 2
    return integrate.quad(lambda x: norm.pdf(x - mu) - math.exp(epsilon) * norm.pdf(x), start, np.inf,
                          epsabs=1e-14, epsrel=1e-10)[0]


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 4.0, 8.0])
def test_gdp_epsilon_of_the_gaussian_mechanism_between_prv_and_rdp(epsilon):
    sigma = noise_multiplier(epsilon, DELTA, 1)  # sensitivity 1: the release is (1/σ)-GDP
    gdp = eps_from_mu(1 / sigma, DELTA)
    # The analytic Gaussian mechanism (Balle & Wang 2018): δ is the hockey-stick divergence, here integrated.
    assert _hockey_stick(gdp, 1 / sigma) == pytest.approx(DELTA, rel=1e-6)
    assert gdp == pytest.approx(opacus_eps_from_mu(mu=1 / sigma, delta=DELTA), rel=1e-6)
    # GDP is exact for one Gaussian release: RDP's conversion and PRV's upper bound can only be above it,
    # PRV by its discretisation error (measured: GDP/PRV 0.978 at ε = 0.5, 0.989 at 1, 0.997 at 4, 0.999 at 8).
    rdp, prv = epsilon_spent([(sigma, 1)], DELTA), epsilon_spent([(sigma, 1)], DELTA, "prv")
    assert 0.9 * prv <= gdp <= prv <= rdp <= epsilon


def test_gdp_epsilon_edges():
    assert eps_from_mu(0.0, DELTA) == 0.0
    assert delta_from_mu(0.0, 1e-6) < DELTA and eps_from_mu(1e-6, DELTA) == 0.0  # δ(0) = 2Φ(μ/2) − 1 ≈ 4e-7
    big = eps_from_mu(40.0, DELTA)  # a release with almost no noise: beyond Opacus' bracket [0, 500]
    assert big > 500 and delta_from_mu(big, 40.0) == pytest.approx(DELTA, rel=1e-6)


# --- The projection test --------------------------------------------------------------------------

def test_projection_whitens_a_symmetric_release_on_its_upper_triangle_only():
    c0 = {"g": np.zeros((2, 2)), "v": np.zeros(3), "unreleased": np.zeros(2)}
    c1 = {"g": np.array([[0.0, 3.0], [3.0, 0.0]]), "v": np.array([4.0, 0.0, 5.0]), "unreleased": np.ones(2)}
    stds = {"g": 1.0, "v": np.array([2.0, 1.0, 0.0])}  # v[2] has std 0: not released
    test = ProjectionTest.from_centres(c0, c1, stds, symmetric=("g",))
    assert test.mu == pytest.approx(math.sqrt(3**2 + (4 / 2) ** 2))  # the mirrored 3 and v[2] do not count
    assert test.statistic(c0) == 0.0 and test.statistic(c1) == pytest.approx(test.mu)
    assert ProjectionTest.from_centres(c0, c1, stds).mu == pytest.approx(math.sqrt(2 * 3**2 + 2**2))
    with pytest.raises(ValueError, match="nothing to tell apart"):
        ProjectionTest.from_centres(c0, c0, stds)


# --- The driver on the real span release -----------------------------------------------------------

def _canary_centres() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], SpanBounds]:
    """c₀ = f(D), c₁ = f(D ∪ {z}) from `ClippedSpanSums.update`, with z exactly at every bound.

    z's tokens lie on distinct axes (X = 3 [e₁..e₄], R = 0.5 [e₅..e₈]), so its Gram change 9 I₄ is
    diagonal: the upper triangle the mechanism noises carries all of ‖ΔG‖_F = B_G, and the whitened
    change reaches the ceiling μ = 1/σ. The bounds are z's own norms, so z's weight is exactly 1.
    """
    x = torch.zeros(1, TOKENS, DIM, dtype=torch.float64)
    for t in range(TOKENS):
        x[0, t, t] = 3.0
    r = torch.zeros_like(x)
    for t in range(TOKENS):
        r[0, t, TOKENS + t] = 0.5
    norms = image_norms(x, r)
    bounds = SpanBounds(**{k: float(norms[k][0]) for k in STATISTICS})
    prior = LinearMap(torch.eye(DIM, dtype=torch.float64), None)
    g = torch.Generator().manual_seed(0)
    xd = torch.randn(20, TOKENS, DIM, generator=g, dtype=torch.float64)
    yd = xd + 0.3 * torch.randn(20, TOKENS, DIM, generator=g, dtype=torch.float64)
    without, with_canary = ClippedSpanSums.zeros(DIM), ClippedSpanSums.zeros(DIM)

    def add(sums: ClippedSpanSums, x: torch.Tensor, y: torch.Tensor) -> None:
        sums.update(x, y, prior, release_weights({"span": (x, y)}, {"span": prior}, {"span": bounds}))

    add(without, xd, yd)
    add(with_canary, xd, yd)
    add(with_canary, x, x + r)
    return without.to_arrays(), with_canary.to_arrays(), bounds


def _span_release(bounds: SpanBounds, sigma: float) -> tuple[Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
                                                               dict[str, float]]:
    """The real statistics release with secure noise at noise multiplier `sigma`, and its noise stds."""
    parts = span_parts([SPAN], {SPAN: bounds})
    stds = {p.name.split(":")[-1]: p.std(sigma) for p in parts}

    def release(centre: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        sums = ClippedSpanSums(**{k: torch.tensor(v) for k, v in centre.items()})
        released = noisy_spans({"linear": {"calibration": {SPAN: sums}}}, parts, sigma, NoiseSource.secure())
        return released["linear"]["calibration"][SPAN].to_arrays()

    return release, stds


def _mu_hat_below(x: float, mu: float, trials: int) -> float:
    """P(μ̂ <= x) for a μ-GDP release: μ̂ √(n/2) is noncentral t with 2n − 2 degrees of freedom."""
    scale = math.sqrt(trials / 2)
    return float(nct.cdf(x * scale, 2 * trials - 2, mu * scale))


def _mu_hat_where(end: int, value: float, trials: int, confidence: float) -> float:
    """The μ̂ at which the driver's interval has its lower (end 0) or upper (end 1) end at `value`."""
    return optimize.brentq(lambda m: mu_confidence_interval(m, trials, confidence)[end] - value, value - 10, value + 10)


def _miss_probability(mu: float, ceiling: float, trials: int, confidence: float) -> float:
    """P(mu_low <= ceiling): the driver misses a μ-GDP release whose μ exceeds the ceiling."""
    return _mu_hat_below(_mu_hat_where(0, ceiling, trials, confidence), mu, trials)


def _outside_probability(mu: float, trials: int, confidence: float) -> float:
    """P(μ is outside [mu_low, mu_high]) for a μ-GDP release."""
    return (_mu_hat_below(_mu_hat_where(1, mu, trials, confidence), mu, trials)
            + 1 - _mu_hat_below(_mu_hat_where(0, mu, trials, confidence), mu, trials))


@pytest.mark.parametrize("epsilon", [1.0, 4.0])
def test_audit_of_the_real_release_stays_within_the_claimed_epsilon(epsilon):
    # A false alarm needs μ outside its interval (probability computed below; the Gaussian-DP bound
    # exceeds ε only then) or a Clopper-Pearson bound that fails (probability <= 1 − SURE = 1e-7).
    trials = 2000
    c0, c1, bounds = _canary_centres()
    sigma = noise_multiplier(epsilon, DELTA, 1)
    release, stds = _span_release(bounds, sigma)
    assert _outside_probability(1 / sigma, trials, SURE) + (1 - SURE) < 1e-6
    result = audit_release(release, c0, c1, stds, trials, DELTA, epsilon, sigma, symmetric=("gram",), confidence=SURE)
    assert result.mu_expected == pytest.approx(1 / sigma, rel=1e-9)  # the canary sits at every bound
    assert result.mu_low <= result.mu_expected <= result.mu_high
    assert result.epsilon_cp <= epsilon
    assert result.epsilon_gdp <= epsilon


def test_audit_detects_a_missing_factor_sqrt2_in_the_noise():
    # σ/√2 of the noise: the release is (√2/σ)-GDP. At ε = 4, 1000 trials per side miss it with probability
    # 1.1e-8 (`_miss_probability`); at ε = 1 the same needs 9,000 per side (6.2e-7; 4.1e-6 at 8,000).
    epsilon, trials = 4.0, 1000
    c0, c1, bounds = _canary_centres()
    sigma = noise_multiplier(epsilon, DELTA, 1)
    _, stds = _span_release(bounds, sigma)
    buggy, _ = _span_release(bounds, sigma / math.sqrt(2))
    assert _miss_probability(math.sqrt(2) / sigma, 1 / sigma, trials, 0.95) < 1e-6
    result = audit_release(buggy, c0, c1, stds, trials, DELTA, epsilon, sigma, symmetric=("gram",))
    assert result.mu_low > result.mu_ceiling


def test_audit_detects_a_canary_that_moves_a_second_record():
    # The release on D' moves as if a second record changed as much as the canary (say, a split that
    # depends on the other images): (2/σ)-GDP. At ε = 1, 2000 trials per side miss it with probability 3.8e-9.
    epsilon, trials = 1.0, 2000
    c0, c1, bounds = _canary_centres()
    sigma = noise_multiplier(epsilon, DELTA, 1)
    release, stds = _span_release(bounds, sigma)

    def moves_two_records(centre: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return release({k: 2 * v - c0[k] for k, v in centre.items()})

    assert _miss_probability(2 / sigma, 1 / sigma, trials, 0.95) < 1e-6
    result = audit_release(moves_two_records, c0, c1, stds, trials, DELTA, epsilon, sigma, symmetric=("gram",))
    assert result.mu_low > result.mu_ceiling


def test_audit_detects_a_tenth_of_the_noise_with_clopper_pearson():
    # With σ/10, t is N(0, 0.01) on D and N(1/σ, 0.01) on D'; at the a priori threshold μ/2 both error rates
    # are p = Φ̄(10/(2σ)) ≈ 0.109. Clopper-Pearson alone (no Gaussian assumption) then exceeds ε unless
    # more than k_max errors occur on a side: P(miss) <= 2 P(Binomial(n, p) > k_max), computed below.
    epsilon, trials = 1.0, 500
    c0, c1, bounds = _canary_centres()
    sigma = noise_multiplier(epsilon, DELTA, 1)
    _, stds = _span_release(bounds, sigma)
    buggy, _ = _span_release(bounds, sigma / 10)
    each = 1 - 0.05 / len(THRESHOLD_OFFSETS)
    k_max = max(k for k in range(trials) if epsilon_lower_bound(k, trials, k, trials, DELTA, each) > epsilon)
    assert 2 * binom.sf(k_max, trials, norm.sf(10 / (2 * sigma))) < 1e-6
    result = audit_release(buggy, c0, c1, stds, trials, DELTA, epsilon, sigma, symmetric=("gram",))
    assert result.epsilon_cp > epsilon


def test_audit_of_a_release_without_noise():
    c0, c1, bounds = _canary_centres()
    sigma = noise_multiplier(1.0, DELTA, 1)
    _, stds = _span_release(bounds, sigma)
    result = audit_release(lambda centre: dict(centre), c0, c1, stds, 50, DELTA, 1.0, sigma, symmetric=("gram",))
    # t is the same number in every trial: its pooled std is 0 or a rounding error, μ infinite or nearly.
    assert result.mu_low > 1e6 and result.epsilon_gdp > 1e6
    assert result.epsilon_cp > 1.0
