"""The site's gate on every release: policy check, noise calibration, ledger entry, then noise.

Order matters: the request is validated and checked against the site's policy before any image is
read, and the release is written to the ledger before its payload exists, so a refused or failed
step sends nothing and a crash can only over-count the budget. A release asked again (a restarted
site, a redelivered message) re-sends its stored payload: it is never noised, nor spent, twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from ..privacy.ledger import LedgerEntry, PrivacyLedger, now
from ..privacy.mechanism import NoiseSource
from ..privacy.policy import PrivacyRequest, SecureRound, SitePolicy, check_images, check_request, spec_hash
from ..privacy.release_store import Arrays, ReleaseStore
from ..privacy.sensitivity import Part

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grant:
    """Permission for one release: the site's noise multiplier (σ, or σ/√K when split) and its noise."""

    site_sigma: float
    noise: NoiseSource


def noise_source(request: PrivacyRequest, site_name: str, release: str) -> NoiseSource:
    if request.seed is None:
        return NoiseSource.secure()
    digest = hashlib.sha256(f"{request.seed}/{site_name}/{release}".encode()).digest()
    return NoiseSource.seeded(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class RunSpec:
    """What a release serves: the run's id, its privacy request (None: exact sums), and the rest of
    the specification as text (hashed into the ledger)."""

    run_id: str
    privacy: PrivacyRequest | None
    spec: tuple[str, ...] = ()


@dataclass(frozen=True)
class Release:
    """One release being served: its grant (None: exact sums), the payload stored by an earlier
    attempt (send it as is), and `keep`, which stores a new payload before it is sent."""

    grant: Grant | None
    stored: Arrays | None = None
    _store: Callable[[Arrays], None] | None = None

    def keep(self, arrays: Arrays) -> Arrays:
        if self._store is not None:
            self._store(arrays)
        return arrays


@contextlib.contextmanager
def open_release(policy: SitePolicy, run: RunSpec, release: str, summaries: Mapping[str, int], *, site_name: str,
                 parts: Sequence[Part] | None, secure: SecureRound | None = None) -> Iterator[Release]:
    """Check, account and record one release, idempotently per (run id, release).

    `summaries` are the image counts of each sum the release makes (e.g. calibration and held-out),
    each checked against ``min_images``; `secure` is what the site's SecAgg+ state shows of the round
    (None: a plain reply, which must carry the full noise). Exact statistics (the policy allows no DP)
    are recomputed on every ask: the same sums each time.
    """
    request, run_id = run.privacy, run.run_id
    check_request(policy, request, release, secure)
    check_images(policy, summaries)
    if request is None:
        yield Release(None)
        return
    sigma, site_sigma = request.noise_multiplier(), request.site_noise_multiplier()
    noise = noise_source(request, site_name, release)
    entry = LedgerEntry(run_id=run_id, release=release, spec_sha256=spec_hash(request.to_json(), release, *run.spec),
                        mechanism="gaussian", noise_multiplier=sigma,
                        noise_std={p.name: p.std(site_sigma) for p in parts or ()}, noise=noise.mode,
                        aggregation=f"{request.aggregation} (noise split over {request.noise_sites} sites)"
                        if request.noise_sites > 1 else request.aggregation,
                        images=sum(summaries.values()), epsilon_run=request.epsilon, delta=request.delta, time=now(),
                        site_noise_multiplier=site_sigma, accountant=request.accountant, releases=request.releases)
    ledger, store = PrivacyLedger(policy.ledger), ReleaseStore(policy.ledger)
    grant = Grant(site_sigma, noise)
    with store.locked(run_id, release):
        recorded = ledger.record(entry, budget=policy.epsilon, delta=policy.delta, accountant=policy.accountant)
        if recorded.payload_sha256 is not None:
            _logger.info("%s: %s of run %s asked again: re-sending the stored payload", site_name, release, run_id)
            yield Release(grant, store.load(run_id, release, recorded.payload_sha256))
            return
        _logger.info("%s: %s release granted: σ=%.4g (site share %.4g), %s", site_name, release, sigma, site_sigma,
                     noise.mode)
        yield Release(grant, None, lambda arrays: ledger.complete(run_id, release, store.save(run_id, release, arrays)))
