"""The privacy audit, part 2: a canary audit of the real release (issue #12). Small here; at full size in
benchmarks/canary_audit.py, whose figures are in docs/privacy.md.

D holds ordinary images; D' adds a canary crafted to move the release as far as its bounds allow (a
checkerboard far outside them, on the calibration side of the site's per-image decision). The exact
sums of both come from the real site (its ClientApp, gate, selection and clipping: the same-seed trick
of test_neighbouring_datasets.py); the site's own noise step then releases each thousands of times with
fresh CSPRNG noise, and the optimal test (`privacy.empirical`) guesses which dataset each release came
from. Its error rates bound ε from below (Clopper-Pearson), and its measured separation μ̂ must not
exceed 1/σ, what the accounting assumes of any neighbouring pair.

On c272bf5 the canary's D' also moved other images between the calibration and held-out parts, so the
release moved about 2.6 times its bound: μ̂ far above 1/σ.
"""

from __future__ import annotations

import math

import pytest

from tba_fed.privacy.accounting import epsilon_spent, noise_multiplier
from empirical import audit_release

import neighbours as nb
from test_neighbouring_datasets import COUNT, _neighbour, _releases, _site

# The privacy audit is slow: thousands of noisy releases per kind (11% of the time of the tests that start no
# Flower process, measured with --durations=0).
pytestmark = [pytest.mark.usefixtures("server_identity"), pytest.mark.slow]
CONFIDENCE = 1 - 1e-7  # a correct mechanism raises a false alarm with probability below 1e-7


@pytest.mark.parametrize("kind", ["statistics", "similarity", "probe"])
def test_the_released_canary_is_no_easier_to_detect_than_the_claimed_epsilon_allows(tmp_path, audit_bounds, kind):
    base = nb.ordinary(COUNT)
    before = _releases(_site(tmp_path / "D", "image_folder", base), audit_bounds)[kind]
    neighbour, names = _neighbour(base, "middle", "calibration", "image_folder")
    after = _releases(_site(tmp_path / "D2", "image_folder", neighbour, names), audit_bounds)[kind]
    # one release of a run declaring all four: its own ε is what the test can be held to
    sigma = noise_multiplier(nb.EPSILON, 1e-5, 4)
    claimed = epsilon_spent([(sigma, 1)], 1e-5)
    release, stds = nb.mechanism(kind, audit_bounds, sigma, 48, tokens=17)
    result = audit_release(release, before, after, stds, trials=1500, delta=1e-5, claimed_epsilon=claimed,
                           noise_multiplier=sigma, confidence=CONFIDENCE)
    assert result.epsilon_cp <= claimed and result.epsilon_gdp <= claimed
    assert result.mu_low <= result.mu_ceiling  # the canary moves the release no more than 1/σ allows
    assert result.mu_low <= result.mu_expected <= result.mu_high  # and the noise is as stated
    assert math.isclose(result.statistic_std, 1.0, rel_tol=0.1)
    assert result.mu_expected <= result.mu_ceiling * (1 + 1e-9)  # the exact sums moved within the bounds
    assert result.mu_expected > 0.5 * result.mu_ceiling, result  # not vacuous: a canary near its bounds
