"""How a run releases what the sites compute, and how the server turns it into the solver's inputs: one
strategy per mode.

- `Exact`: each site's exact span sums, checked (PSD, counts, ``min_images_per_site``) and added to the
  running sum as they arrive.
- `LocalDP`: each site clips and adds the full noise to residual-form sums around the run's priors; the
  server adds them as they arrive, projects each Gram onto the PSD cone and picks the AdaSSP ridge.
- `Secure`: the same noisy sums, each site adding σ/√min_sites of the noise, summed by SecAgg+ so the
  server never holds one site's sums.

Every release but the statistics one (similarity, probe, accuracy) carries the full noise at each site.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from flwr.app import MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from ..adapter import collected_kinds
from ..errors import TBAInputError
from ..plan import Plan, Span
from ..privacy.accounting import noise_multiplier, replace_one_epsilon
from ..privacy.clipped import SpanBounds, to_span_stats
from ..privacy.mechanism import NoiseSource, describe_noise
from ..privacy.policy import PrivacyRequest
from ..privacy.postprocess import adassp_ridge, psd_projection
from ..privacy.release import noisy_spans
from ..privacy.sensitivity import kind_span_parts, labelled_bounds, probe_parts, span_label, span_parts
from ..privacy.solve import private_inputs
from ..probe import ProbeStats
from ..public_images import public_loader
from ..privacy.public_prior import public_norms, public_span_bounds
from ..solver import LinearMap
from ..stats import SpanStats
from .config import FederatedRunConfig
from .records import from_record
from .rounds import RoundLog, Rounds
from .server_audit import ServerAudit
from .secure_aggregation import default_threshold, secure_sum
from .wire import (MODELS, decode_private_spans, decode_spans, encode_priors, group_name, kind_groups, private_span_shapes,
                   secure_ranges, statistics_groups)

_logger = logging.getLogger(__name__)

NOISE_DRAWS = 20  # re-noisings of the held-out release that give the report's ± on each estimate

PerSplit = dict[str, dict[Span, Any]]


def auto_cost(bounds: Mapping[str, Mapping[Span, SpanBounds]], span: Span) -> str:
    """The one line a run under ``map: auto`` with privacy reports: what releasing both kinds costs. The factor is
    read off the parts themselves (a statistic's noise std in this release over a one-kind release's at the same σ):
    √2, the span shares being split evenly between the kinds (docs/privacy.md)."""
    kinds = tuple(bounds)
    both = {p.name: p for p in kind_span_parts(bounds)}[f"{span_label(kinds[0], span, kinds)}:gram"]
    one = {p.name: p for p in span_parts(list(bounds[kinds[0]]), bounds[kinds[0]])}[f"{span}:gram"]
    return (f"map: auto under privacy: both kinds released, noise std x{both.std(1.0) / one.std(1.0):.2f} per statistic "
            "at the same epsilon")


def check_images(images: int, minimum: int, field: str) -> None:
    if images < minimum:
        raise TBAInputError(field, f"summarises {images} images, the minimum per site is {minimum}")


class RunningSum:
    """The sum over sites of their span statistics, per split: each site's reply is added the moment it is
    accepted, so the server holds one site's statistics at a time, however many sites reply."""

    def __init__(self) -> None:
        self.per_split: PerSplit = {}

    def add(self, per_split: PerSplit) -> None:
        for split, per_span in per_split.items():
            total = self.per_split.get(split)
            self.per_split[split] = per_span if total is None else {s: total[s] + v for s, v in per_span.items()}


@dataclass
class SolverInputs:
    """What the statistics round gives the solver and the report: the sums per kind collected
    (`collected_kinds`: both under ``map: auto``), as `pipeline.solve_kinds` takes them."""

    calibration: dict[str, dict[Span, SpanStats]]
    holdout: dict[str, dict[Span, SpanStats]]
    calibration_images: int  # as released (a private release: its noisy weight, rounded)
    ridge_lambdas: dict[str, dict[Span, float]] | None = None
    privacy: dict[str, Any] | None = None

    @property
    def holdout_images(self) -> int:
        return next(iter(next(iter(self.holdout.values())).values())).images


class Exact:
    """Exact sums: no privacy request, nothing clipped or noised."""

    private = False

    def __init__(self, config: FederatedRunConfig) -> None:
        self.config = config

    def similarity_request(self) -> PrivacyRequest | None:
        return None

    def probe_request(self) -> PrivacyRequest | None:
        return None

    def statistics_settings(self, model: nn.Module, plan: Plan, priors: Mapping[Span, LinearMap]) -> dict[str, Any]:
        return {"plan": str(plan), "privacy": ""}

    def _decode(self, arrays: Any, plan: Plan, dim: int) -> tuple[PerSplit, int]:
        stats = decode_spans(arrays, plan.spans, dim, psd_tolerance=self.config.federation.psd_tolerance,
                             map_choice=self.config.map)
        count = next(iter(stats.values()))[plan.spans[0]].images
        check_images(count, self.config.federation.min_images_per_site, "statistics.images")
        return stats, count

    def statistics_round(self, rounds: Rounds, plan: Plan, dim: int, content: Callable[[], RecordDict]
                         ) -> tuple[PerSplit, int]:
        """Ask every site for its sums and add each valid reply to the running sum as it arrives; returns the
        sum and how many sites it holds."""
        total = RunningSum()

        def accept(reply: RecordDict) -> int:
            stats, count = self._decode(from_record(reply.array_records["statistics"]), plan, dim)
            total.add(stats)
            return count

        replies = rounds.ask("statistics", f"{MessageType.QUERY}.statistics", content, accept, images=lambda count: count)
        return total.per_split, len(replies)

    def solver_inputs(self, released: PerSplit, sites: int, priors: Mapping[Span, LinearMap], tokens: int,
                      spans: Iterable[Span]) -> SolverInputs:
        calibration = kind_groups(released, self.config.map, "calibration")
        return SolverInputs(calibration, kind_groups(released, self.config.map, "holdout"),
                            next(iter(next(iter(calibration.values())).values())).images)

    def holdout_draws(self, released: PerSplit, priors: Mapping[Span, LinearMap], tokens: int
                      ) -> dict[str, dict[Span, list]]:
        """Each kind's held-out sums re-noised as they were released (none for exact sums): the report's spread."""
        return {kind: {s: [] for s in per_span} for kind, per_span in kind_groups(released, self.config.map, "holdout").items()}

    def probe_stats(self, pooled: dict[str, ProbeStats], sites: int) -> dict[str, ProbeStats]:
        return pooled


class LocalDP(Exact):
    """Each site clips to bounds the server sets from public photos and adds the full noise; σ covers every
    release of the run at each site."""

    private = True
    secure = False

    def __init__(self, config: FederatedRunConfig, model: nn.Module, public: Any, releases: tuple[str, ...]) -> None:
        super().__init__(config)
        assert config.privacy is not None
        self.privacy, self.releases = config.privacy, releases
        # block and feature norms bound only the similarity and probe releases: a full forward pass, so only when asked
        self.norms = public_norms(model, public, config.token_mode) if {"similarity", "probe"} & set(releases) else None
        self.sigma = noise_multiplier(self.privacy.epsilon, self.privacy.delta, len(releases), self.privacy.accountant)
        self.bounds: dict[str, dict[Span, SpanBounds]] = {}  # per kind released (both under map: auto)
        self.statistics: PrivacyRequest | None = None
        self.probe: PrivacyRequest | None = None
        self.parts: list = []  # the statistics release's per-statistic sensitivities, once it is solved
        self.spread = 1.0  # its total noise over σ

    def request(self, secure: bool = False, **clip: Any) -> PrivacyRequest:
        """The privacy part of a round's specification; only a `Secure` statistics round splits the noise."""
        fed = self.config.federation
        return PrivacyRequest(epsilon=self.privacy.epsilon, delta=self.privacy.delta, accountant=self.privacy.accountant,
                              releases=self.releases, aggregation="secure" if secure else "local",
                              noise_sites=fed.min_sites if secure else 1, seed=self.privacy.seed, **clip)

    def similarity_request(self) -> PrivacyRequest:
        return self.request(clip_blocks=self.norms.block_bounds(self.privacy.clip_scale))

    def probe_request(self) -> PrivacyRequest:
        self.probe = self.request(clip_features=self.norms.feature_bound(self.privacy.clip_scale))
        return self.probe

    def statistics_settings(self, model: nn.Module, plan: Plan, priors: Mapping[Span, LinearMap]) -> dict[str, Any]:
        held_out_crops = public_loader(model, self.privacy.public_images, seed=1)  # residual bounds not fitted on
        self.bounds = {kind: public_span_bounds(model, held_out_crops, plan.spans, priors, self.config.token_mode,
                                                self.privacy.clip_scale, kind) for kind in collected_kinds(self.config.map)}
        self.statistics = self.request(self.secure, clip_spans={label: b.as_tuple()
                                                                for label, b in labelled_bounds(self.bounds).items()})
        return {"plan": str(plan), "privacy": self.statistics.to_json(), "prior-maps": encode_priors(priors)}

    def _decode(self, arrays: Any, plan: Plan, dim: int) -> tuple[PerSplit, int]:
        stats = decode_private_spans(arrays, plan.spans, dim, self.config.map)
        return stats, int(round(float(stats[statistics_groups(self.config.map)[0]][plan.spans[0]].weight)))

    def solver_inputs(self, released: PerSplit, sites: int, priors: Mapping[Span, LinearMap], tokens: int,
                      spans: Iterable[Span]) -> SolverInputs:
        """Held-out sums as released, made ordinary sums; calibration sums cleaned (PSD projection, AdaSSP ridge);
        for each kind released (both under ``map: auto``, whose choice per span is then post-processing)."""
        spans, privacy, request, sigma = list(spans), self.privacy, self.statistics, self.sigma
        assert request is not None
        choice = self.config.map
        kinds = collected_kinds(choice)
        ordinary = {group: {s: to_span_stats(sums, priors[s], tokens) for s, sums in per_span.items()}
                    for group, per_span in released.items()}
        self.parts = kind_span_parts(self.bounds)
        self.spread = math.sqrt(sites / request.noise_sites)  # total noise over σ per release
        by_name = {p.name: p for p in self.parts}
        first = group_name(choice, kinds[0], "calibration")
        count = float(released[first][spans[0]].weight)
        if ordinary[first][spans[0]].images < 1:  # nothing to solve: say why instead of failing in the solver
            raise TBAInputError("privacy", f"the released calibration image count is {count:.1f} (noise std "
                                           f"{by_name['weight'].std(sigma) * self.spread:.1f}): the sites' clipped "
                                           "images are too few for this ε", "add images, raise epsilon or clip_scale")
        calibration, holdout, lambdas, per_span = {}, {}, {}, {}
        for kind in kinds:
            labels = {s: span_label(kind, s, kinds) for s in spans}
            gram_std = {s: by_name[f"{labels[s]}:gram"].std(sigma) * self.spread for s in spans}
            calibration[kind], ridges = private_inputs(released[group_name(choice, kind, "calibration")], priors,
                                                       gram_std, tokens, bias=self.config.bias)
            holdout[kind] = ordinary[group_name(choice, kind, "holdout")]
            lambdas[kind] = {s: r.ridge_lambda for s, r in ridges.items()}
            per_span |= {labels[s]: {"gram_noise_std": gram_std[s], "ridge_lambda": r.ridge_lambda,
                                     "noise_bound": r.noise_bound, "min_eigenvalue_estimate": r.min_eigenvalue_estimate}
                         for s, r in ridges.items()}
        summary = {
            "epsilon": privacy.epsilon, "delta": privacy.delta, "accountant": privacy.accountant,
            "adjacency": "add/remove one image",
            "epsilon_replace_one": replace_one_epsilon([(sigma, len(request.releases))], privacy.delta, privacy.accountant),
            "releases": list(request.releases), "noise_multiplier": sigma,
            "aggregation": "secure aggregation (SecAgg+), noise split over sites" if self.secure else "local noise at each site",
            "noise_sites": request.noise_sites, "sites_summed": sites,
            "noise": describe_noise(privacy.seed),
            "clip_spans": {k: list(v) for k, v in request.clip_spans.items()},
            "spans": per_span,
        }
        if len(kinds) > 1:
            summary["map_auto"] = auto_cost(self.bounds, spans[0])
            _logger.info("%s", summary["map_auto"])
        return SolverInputs(calibration, holdout, ordinary[first][spans[0]].images, lambdas, summary)

    def holdout_draws(self, released: PerSplit, priors: Mapping[Span, LinearMap], tokens: int
                      ) -> dict[str, dict[Span, list]]:
        choice = self.config.map
        groups = {kind: group_name(choice, kind, "holdout") for kind in collected_kinds(choice)}
        draws: dict[str, dict[Span, list[SpanStats]]] = {kind: {s: [] for s in released[g]} for kind, g in groups.items()}
        for k in range(NOISE_DRAWS):  # both kinds' held-out sums re-noised together, as released (one weight)
            renoised = noisy_spans({g: released[g] for g in groups.values()}, self.parts, self.sigma * self.spread,
                                   NoiseSource(k))
            for kind, group in groups.items():
                for s in draws[kind]:
                    draws[kind][s].append(to_span_stats(renoised[group][s], priors[s], tokens))
        return draws

    def probe_stats(self, pooled: dict[str, ProbeStats], sites: int) -> dict[str, ProbeStats]:
        """Noisy probe sums made solvable: Gram projected onto the PSD cone plus the AdaSSP ridge on its diagonal."""
        assert self.probe is not None and self.probe.clip_features is not None
        parts = {p.name: p for p in probe_parts(MODELS, self.probe.clip_features)}
        std = parts["original:gram"].std(self.sigma) * math.sqrt(sites)
        out = {}
        for which, stats in pooled.items():
            choice = adassp_ridge(stats.gram, std)
            gram = psd_projection(stats.gram)
            gram.diagonal().add_(choice.ridge_lambda)
            out[which] = replace(stats, gram=gram)
        return out


class Secure(LocalDP):
    """`LocalDP` whose statistics are summed by SecAgg+: each site adds σ/√min_sites of the noise.

    The server never holds one site's sums: SecAgg+ hands it the sum over at least ``min_sites`` sites, which
    is decoded and checked like any private reply (keys, shapes, float64, finiteness; no PSD check, since the
    noisy Gram is legitimately indefinite)."""

    secure = True

    def statistics_round(self, rounds: Rounds, plan: Plan, dim: int, content: Callable[[], RecordDict]
                         ) -> tuple[PerSplit, int]:
        assert self.statistics is not None
        log = rounds.start("statistics (secure aggregation)")
        summed = secure_statistics_round(rounds.grid, rounds.nodes, self.config, self.statistics, plan, dim, content(),
                                         log, rounds.audit)
        rounds.nodes = log.nodes
        return summed


def secure_statistics_round(grid: Grid, nodes: list[int], config: FederatedRunConfig, request: PrivacyRequest,
                            plan: Plan, dim: int, content: RecordDict, log: RoundLog, audit: ServerAudit | None = None
                            ) -> tuple[PerSplit, int]:
    """SecAgg+ sum of the sites' noisy span sums (each site adds σ/√noise_sites of the noise); returns the sum
    and how many sites it holds."""
    fed = config.federation
    ranges = secure_ranges(request, plan.spans, fed.max_images_per_site, config.map)
    settings = {**dict(content.config_records["config"].items()), "max-images": fed.max_images_per_site}
    try:
        # the server must not be able to unmask a sum over fewer sites than the noise is split across
        threshold = max(default_threshold(len(nodes)), request.noise_sites)
        result = secure_sum(grid, nodes, settings, ranges, private_span_shapes(plan.spans, dim, config.map),
                            timeout=fed.round_timeout, min_sites=fed.min_sites, reconstruction_threshold=threshold,
                            site_names=log.names)
    except Exception as err:  # recorded, then the run stops
        if audit is not None:
            audit.secure_round(log.name, log.names, nodes, settings, None, str(err))
        raise
    if audit is not None:
        audit.secure_round(log.name, log.names, nodes, settings, result)
    summed = decode_private_spans(result.arrays, plan.spans, dim, config.map)
    log.seconds = result.seconds
    log.sites["secure sum"] = {"node_id": -1, "status": "ok",
                               "images": int(round(float(summed[statistics_groups(config.map)[0]][plan.spans[0]].weight))),
                               "reason": f"SecAgg+ sum of {result.sites} sites; quantisation error <= "
                                         f"{max(b / ranges[k] for k, b in result.error_bound.items()):.2e} of each range"}
    log.nodes = list(nodes)
    _logger.info("statistics: secure sum of %d sites in %.1f s", result.sites, result.seconds)
    return summed, result.sites


def release_for(config: FederatedRunConfig, model: nn.Module, public: Any) -> Exact:
    """The run's strategy, from its privacy section; `public`: the public crops (None without privacy)."""
    if config.privacy is None:
        return Exact(config)
    releases = (() if config.plan is not None else ("similarity",)) + ("statistics",) + \
        (("probe", "accuracy") if config.evaluation.enabled else ())
    kind = Secure if config.privacy.aggregation == "secure" else LocalDP
    return kind(config, model, public, releases)
