"""The site's gate on every release: policy check, noise calibration, ledger entry, then noise.

Order matters: the request is validated and checked against the site's policy before any image is
read, and the release is written to the ledger before its payload exists, so a refused or failed
step sends nothing and a crash can only over-count the budget.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ..privacy.ledger import LedgerEntry, PrivacyLedger, now
from ..privacy.mechanism import NoiseSource
from ..privacy.policy import PrivacyRequest, SitePolicy, check_request, spec_hash
from ..privacy.sensitivity import Part

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grant:
    """Permission for one release: the site's noise multiplier (σ, or σ/√K when split) and its noise."""

    sigma: float
    site_sigma: float
    noise: NoiseSource


def noise_source(request: PrivacyRequest, site_name: str, release: str) -> NoiseSource:
    if request.seed is None:
        return NoiseSource.secure()
    digest = hashlib.sha256(f"{request.seed}/{site_name}/{release}".encode()).digest()
    return NoiseSource.seeded(int.from_bytes(digest[:8], "little"))


def grant_release(policy: SitePolicy, request: PrivacyRequest | None, release: str, images: int, *,
                  site_name: str, run_id: str, spec: Sequence[str], parts: Sequence[Part] | None) -> Grant | None:
    """Check, account and record one release; None means exact statistics (policy allows no DP)."""
    check_request(policy, request, release, images)
    if request is None:
        return None
    sigma, site_sigma = request.noise_multiplier(), request.site_noise_multiplier()
    noise = noise_source(request, site_name, release)
    entry = LedgerEntry(run_id=run_id, release=release, spec_sha256=spec_hash(request.to_json(), release, *spec),
                        mechanism="gaussian", noise_multiplier=sigma,
                        noise_std={p.name: p.std(site_sigma) for p in parts or ()}, noise=noise.mode,
                        aggregation=f"{request.aggregation} (noise split over {request.noise_sites} sites)"
                        if request.noise_sites > 1 else request.aggregation,
                        images=images, epsilon_run=request.epsilon, delta=request.delta, time=now())
    PrivacyLedger(policy.ledger).record(entry, budget=policy.epsilon, delta=policy.delta, run_releases=request.releases,
                                        accountant=request.accountant)
    _logger.info("%s: %s release granted: σ=%.4g (site share %.4g), %s", site_name, release, sigma, site_sigma, noise.mode)
    return Grant(sigma, site_sigma, noise)
