"""What a site agrees to release, and the privacy request a run makes of it.

The request travels from the server as data (JSON validated against `PrivacyRequest`, unknown keys
refused); the policy lives in the site's own YAML. `check_request` fails closed: anything the policy
does not allow is refused with the reason, before a single image is read.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from ..config import _format_validation_error, _Section
from ..errors import SiteRefusal, TBAInputError
from ..plan import Span
from .accounting import MAX_RUN_EPSILON, noise_multiplier
from .clipped import SpanBounds
from .sensitivity import span_label

RELEASES = ("similarity", "statistics", "probe", "accuracy")
Release = Literal["similarity", "statistics", "probe", "accuracy"]


class PolicyRefusal(SiteRefusal):
    """The site's policy does not allow what the server asked: nothing is computed or sent."""


class PrivacyRequest(_Section):
    """The privacy part of a run specification, as the server sends it to every site."""

    epsilon: float = Field(gt=0, le=MAX_RUN_EPSILON, description="ε the whole run may spend at each site")
    delta: float = Field(gt=0, lt=1)
    accountant: Literal["rdp", "prv"] = "rdp"
    releases: tuple[Release, ...] = Field(min_length=1, description="every release the run will make, in order")
    aggregation: Literal["local", "secure"] = Field(
        "local", description="local: each site adds the full noise; secure: SecAgg+ sum, noise split over noise_sites")
    noise_sites: int = Field(1, ge=1, description="secure aggregation: sites whose noise shares add up to σ")
    seed: int | None = Field(None, description="seeded noise for tests and simulations; None draws from the CSPRNG")
    clip_spans: dict[str, tuple[float, float, float, float, float]] = Field(
        default_factory=dict, description="span (kind/span under map: auto) -> per-image bounds of ‖XᵀX‖, ‖XᵀR‖, ‖Σx‖, ‖Σr‖, "
                                    "‖R‖² (clipped.SpanBounds)")
    clip_blocks: tuple[float, ...] = ()
    clip_features: float | None = None

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyRequest:
        if len(set(self.releases)) != len(self.releases):
            raise TBAInputError("releases", "releases must not repeat")
        if self.aggregation == "local" and self.noise_sites != 1:
            raise TBAInputError("noise_sites", "noise_sites > 1 splits the noise, which is only safe under secure "
                                               "aggregation")
        spans = [b for pair in self.clip_spans.values() for b in pair]
        features = [] if self.clip_features is None else [self.clip_features]
        for name, bounds in (("clip_spans", spans), ("clip_blocks", self.clip_blocks), ("clip_features", features)):
            if any(b <= 0 for b in bounds):  # finite: refused by the schema (allow_inf_nan=False)
                raise TBAInputError(name, "clipping bounds must be positive")
        return self

    def clip_bounds(self) -> list[float]:
        """Every clipping bound the request names (spans, blocks, features)."""
        return [b for pair in self.clip_spans.values() for b in pair] + list(self.clip_blocks) + \
            ([self.clip_features] if self.clip_features is not None else [])

    def noise_multiplier(self) -> float:
        """σ of every release in the run: its (ε, δ) composed over all its declared releases."""
        return noise_multiplier(self.epsilon, self.delta, len(self.releases), self.accountant)

    def site_noise_multiplier(self) -> float:
        """The share one site adds: σ, or σ/√noise_sites when secure aggregation splits the noise."""
        return self.noise_multiplier() / math.sqrt(self.noise_sites)

    def kind_bounds(self, spans: Sequence[Span], kinds: Sequence[str]) -> dict[str, dict[Span, SpanBounds]]:
        """Per-image bounds of each span's statistics of each map kind released (``clip_spans`` names them by
        `span_label`: ``kind/span`` when both kinds are released); a span of a kind without bounds is an error."""
        labels = {(kind, span): span_label(kind, span, kinds) for kind in kinds for span in spans}
        if missing := [label for label in labels.values() if label not in self.clip_spans]:  # nothing unbounded is released
            _refuse("privacy.clip_spans", f"no clipping bounds for {', '.join(missing)}",
                    "a release of both map kinds (map: auto) needs bounds for each: 'linear/s->e' and 'folded/s->e'"
                    if len(kinds) > 1 else None)
        return {kind: {span: SpanBounds(*self.clip_spans[labels[kind, span]]) for span in spans} for kind in kinds}

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> PrivacyRequest:
        try:
            return cls.model_validate_json(text)
        except ValidationError as err:
            raise _format_validation_error(err, "privacy") from None


class SitePolicy(_Section):
    """A site's own privacy policy: its caps hold whatever the server asks."""

    require_dp: bool = Field(True, description="refuse runs that ask for exact (noise-free) statistics")
    epsilon: float = Field(1.0, gt=0, description="total ε this site's data may spend over all runs")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ at which budgets are accounted; runs may not ask for more")
    min_images: int = Field(100, ge=1, description="refuse a release summarising fewer images")
    releases: tuple[Release, ...] = Field(("statistics",), description="statistics this site will release at all")
    max_clip: float | None = Field(None, gt=0, description="refuse clipping bounds above this (fixed-point safety)")
    secure_aggregation: Literal["allowed", "required", "refused"] = "allowed"
    min_noise_sites: int = Field(3, ge=2, description="split noise only if at least this many sites' shares add up")
    max_noise_sites: int = Field(10, ge=2, description="never add less than σ/√max_noise_sites: with m sites splitting "
                                                       "the noise, m − 1 colluding sites leave this site only its share")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="how this site composes its releases against its "
                                                                 "budget, whatever accountant a run names")
    allow_seeded_noise: bool = Field(False, description="seeded noise is for tests and simulations only")
    ledger: Path | None = Field(None, description="this site's privacy ledger (JSON, written atomically); "
                                                  "simulations keep one per site beside the site's output")

    @model_validator(mode="after")
    def _noise_sites(self) -> SitePolicy:
        if self.max_noise_sites < self.min_noise_sites:
            raise TBAInputError("max_noise_sites", f"{self.max_noise_sites} is below min_noise_sites "
                                                   f"({self.min_noise_sites})", "raise max_noise_sites")
        return self


@dataclass(frozen=True)
class SecureRound:
    """What a site sees, in its own SecAgg+ state, of the secure sum it is asked to contribute to."""

    participants: tuple[int, ...]  # node ids whose public keys this site received in the set-up stage, its own included
    threshold: int  # key shares needed to unmask: the server can unmask no sum over fewer sites than this


def spec_hash(*parts: str) -> str:
    """sha256 of the run specification a release served (recorded in the ledger)."""
    return hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()


def _refuse(field: str, message: str, fix: str | None = None) -> None:
    raise PolicyRefusal(field, f"refused by the site's privacy policy: {message}", fix)


def check_request(policy: SitePolicy, request: PrivacyRequest | None, release: str,
                  secure: SecureRound | None = None) -> None:
    """Refuse, with the reason, any request the policy does not allow; reads only the request and the policy.

    `secure` is None for a plain reply, which reaches the server on its own and so must carry the full
    noise whatever the request says; otherwise it is what the site's SecAgg+ state shows of the round.
    """
    if release not in policy.releases:
        _refuse("privacy.releases", f"this site does not release {release!r} (it releases {', '.join(policy.releases)})")
    if request is None:
        if policy.require_dp:
            _refuse("privacy", "the run asks for exact statistics and this site requires differential privacy",
                    "set a privacy section in the run config")
        return
    if release not in request.releases:
        _refuse("privacy.releases", f"{release!r} is not among the releases the run declared: {request.releases}")
    if request.delta > policy.delta:
        _refuse("privacy.delta", f"δ {request.delta:g} exceeds the site's cap {policy.delta:g}")
    if request.epsilon > policy.epsilon:
        _refuse("privacy.epsilon", f"ε {request.epsilon:g} exceeds the site's total budget {policy.epsilon:g}")
    if request.seed is not None and not policy.allow_seeded_noise:
        _refuse("privacy.seed", "seeded noise is not private; this site draws noise from its CSPRNG only")
    m = request.noise_sites
    if secure is None:
        if request.aggregation != "local" or m != 1:
            _refuse("privacy.aggregation", f"a plain reply reaches the server on its own and carries the full noise; "
                                           f"this request asks for a share of noise split over {m} sites (aggregation "
                                           f"{request.aggregation!r})", "only a SecAgg+ round may split noise")
        if policy.secure_aggregation == "required":
            _refuse("privacy.aggregation", "this site releases statistics only through secure aggregation")
    else:
        if request.aggregation != "secure":
            _refuse("privacy.aggregation", "a secure-aggregation round must carry a privacy request with aggregation "
                                           "'secure'")
        if policy.secure_aggregation == "refused":
            _refuse("privacy.aggregation", "this site does not take part in secure aggregation")
        if m > 1 and m < policy.min_noise_sites:
            _refuse("privacy.noise_sites", f"noise split over {m} sites, the site's minimum is {policy.min_noise_sites}")
        if m > policy.max_noise_sites:
            _refuse("privacy.noise_sites", f"noise split over {m} sites, the site's maximum is {policy.max_noise_sites}")
        if m > len(secure.participants):
            _refuse("privacy.noise_sites", f"noise split over {m} sites, but only {len(secure.participants)} sites "
                                           "take part in this secure sum")
        if m > secure.threshold:
            _refuse("privacy.noise_sites", f"noise split over {m} sites, but SecAgg+ can unmask a sum over as few as "
                                           f"{secure.threshold} (its reconstruction threshold)",
                    "run secure aggregation with a reconstruction threshold of at least noise_sites")
    bounds = request.clip_bounds()
    if policy.max_clip is not None and bounds and max(bounds) > policy.max_clip:
        _refuse("privacy.clip", f"clipping bound {max(bounds):g} exceeds the site's maximum {policy.max_clip:g}")


def check_images(policy: SitePolicy, summaries: Mapping[str, int]) -> None:
    """Refuse a release any of whose summaries (e.g. calibration and held-out sums) covers fewer than
    ``min_images`` images. The refusal reveals one bit about the counts and never the counts themselves:
    they stay in the site's own log."""
    if small := [name for name, count in summaries.items() if count < policy.min_images]:
        _refuse("privacy.min_images", f"the {' and '.join(small)} part of this release would summarise fewer images "
                                      f"than the site's minimum per release ({policy.min_images})")
