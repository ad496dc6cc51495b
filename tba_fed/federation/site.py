"""A site's side of the protocol: its private data, and the sums it is willing to release."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..adapter import ViTAdapter, collected_kinds
from ..calibrate import collect_kind_stats, collect_similarity
from ..checkpoint import MAPS_FILE, manifest, write_compressed
from ..compressed import build_compressed
from ..config import DataConfig, ModelConfig
from ..data import build_dataset, calibration_split, make_loader, pool_indices
from ..errors import TBAInputError
from ..models import create_model
from ..partition import partition
from ..plan import Plan, Span, parse_plan
from ..privacy.policy import RELEASES, PolicyRefusal, PrivacyRequest, SecureRound, SitePolicy, check_request
from ..privacy.clipped import ClippedSpanSums
from ..privacy.passes import collect_clipped_kind_sums, collect_clipped_probe_stats, collect_clipped_similarity
from ..privacy.ranges import clamp
from ..privacy.release import noisy_counts, noisy_probe, noisy_similarity, noisy_spans
from ..privacy.sensitivity import accuracy_parts, kind_span_parts, probe_parts, similarity_parts
from ..privacy.site_state import open_state
from ..probe import ProbeHead, accuracy, collect_probe_stats
from ..selection import Records, development_key, split_indices
from ..solver import LinearMap
from ..stats import SpanStats
from .config import SiteConfig
from .envelope import echo
from .records import from_record, to_record
from .secure_aggregation import secure_round
from .site_admission import admitted_model, check_run_profile
from .site_context import SiteContext
from .site_privacy import RunSpec, open_release
from .wire import (MODELS, Arrays, decode_heads, decode_maps, decode_priors, encode_probe, encode_similarity, encode_spans,
                   group_name, secure_ranges, statistics_groups)

_logger = logging.getLogger(__name__)


@dataclass
class Site:
    """The images one site calibrates on; they never leave this object."""

    name: str
    calibration: DataLoader
    holdout: DataLoader | None
    output: Path | None
    policy: SitePolicy
    device: str = "cpu"
    profile: str = "development"  # simulated sites; a deployed site's YAML says (default production)

    def images(self, *parts: str) -> dict[str, int]:
        """The size of each part named ("calibration", "held-out"); the held-out part is left out if the
        configuration holds no images out."""
        loaders = {"calibration": self.calibration, "held-out": self.holdout}
        return {part: len(loaders[part].dataset) for part in parts if loaders[part] is not None}  # type: ignore[arg-type]


@functools.lru_cache(maxsize=2)
def cached_model(model_json: str) -> nn.Module:
    """Load the base model once per site process (simulation actors are reused across rounds)."""
    return create_model(ModelConfig.model_validate_json(model_json))


def site_model(site: SiteContext, request: Mapping[str, Any]) -> nn.Module:
    """The base model this site serves `request` with, built only once the site admits the request's profile
    and model (`site_admission`): a refused request loads no weights."""
    return cached_model(admitted_model(site, request).model_dump_json())


def simulated_indices(data: DataConfig, dataset: Records, targets: np.ndarray, num_sites: int, site: int, scheme: str,
                      *, alpha: float, shards_per_site: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Site `site`'s calibration and held-out indices in a simulation.

    The pool is the data set a centralised run would use (`data.pool_indices`); it is partitioned across
    sites (which images each simulated hospital holds), then each site decides for each of its images,
    from that image alone, whether it is used and held out, with the key the data seed gives: a
    centralised run on the union of the sites' images selects exactly the same images.
    """
    pool = pool_indices(dataset, data)  # type: ignore[arg-type]
    parts = partition(targets[pool], num_sites, scheme=scheme, alpha=alpha, shards_per_site=shards_per_site,
                      seed=seed)
    return split_indices(dataset, pool[parts[site]], development_key(data.seed), sample_rate=data.sample_rate,
                         holdout_fraction=data.holdout_fraction)


def site_key(config: SiteConfig) -> bytes:
    """The key of a deployed site's per-image decisions: the secret in its initialised state directory;
    a development site without one keys them from its data seed (reproducible, not secret)."""
    if config.state is not None:
        assert config.privacy.ledger is not None
        return open_state(config.state, config.name, config.privacy.ledger).split_key
    if config.profile == "production":  # SiteConfig refuses this; kept as the last line of defence
        raise TBAInputError("state", "a production site needs its state directory", "set state and run tba-fed site init")
    return development_key(config.data.seed)


def _holdout_loader(dataset: Dataset, indices: list[int], data: DataConfig) -> DataLoader | None:
    """None only when the configuration holds nothing out: an empty held-out part is still a part (its size is
    checked against the policy's minimum like any other), so whether it exists never depends on the data."""
    return make_loader(Subset(dataset, indices), data) if data.holdout_fraction > 0 else None


def resolve_site(site: SiteContext, model: nn.Module, request: Mapping[str, Any], release: str | None = None,
                 secure: SecureRound | None = None) -> Site:
    """The site's data: a deployed site's own images, a simulated site's partition of the run's data.

    The `request` (a message's config) must name the site's profile and, for a `release`, pass the site's
    privacy policy (`secure`: what its SecAgg+ state shows of the round), or no image is read at all.
    """
    privacy = PrivacyRequest.from_json(str(request["privacy"])) if request.get("privacy") else None
    check_run_profile(site.name, site.profile, request)
    if release is not None:
        check_request(site.policy, privacy, release, secure)
    config = site.config
    if config is not None:
        key = site_key(config)
        dataset = build_dataset(config.data, model)
        calibration, holdout = calibration_split(dataset, config.data, key)
        return Site(config.name, make_loader(calibration, config.data),
                    _holdout_loader(dataset, holdout.indices, config.data), config.output, config.privacy,
                    config.device, config.profile)
    run = site.run
    num_sites = int(site.node_config.get("num-partitions", run.federation.num_sites))
    dataset = build_dataset(run.data, model)
    p = run.federation.partition
    calibration, holdout = simulated_indices(run.data, dataset, np.asarray(dataset.targets), num_sites,  # type: ignore
                                             site.partition, p.scheme, alpha=p.alpha, shards_per_site=p.shards_per_site,
                                             seed=p.seed)
    return Site(site.name, make_loader(Subset(dataset, calibration.tolist()), run.data),
                _holdout_loader(dataset, holdout.tolist(), run.data), site.output, site.policy, run.device)


def run_spec(run_id: int | str, config: Mapping[str, Any], secure: SecureRound | None = None) -> RunSpec:
    """The run specification a release serves; the privacy request is data, validated by its schema. A secure
    release's specification includes the SecAgg+ participants, so its stored payload is never re-sent into a
    sum over other sites (the server could subtract one sum from the other)."""
    privacy = str(config.get("privacy", ""))
    spec = tuple(f"{key}={config[key]}" for key in sorted(config) if key != "privacy")
    if secure is not None:
        spec += (f"secure-sum participants={list(secure.participants)} threshold={secure.threshold}",)
    return RunSpec(str(run_id), PrivacyRequest.from_json(privacy) if privacy else None, spec)


def similarity_reply(model: nn.Module, site: Site, token_mode: str, run: RunSpec) -> Arrays:
    adapter = ViTAdapter(model)
    request = run.privacy
    if request is not None and len(request.clip_blocks) != adapter.num_blocks:
        raise TBAInputError("privacy.clip_blocks", f"{len(request.clip_blocks)} bounds for {adapter.num_blocks} blocks")
    tokens = adapter.tokens_per_image(token_mode)
    parts = similarity_parts(request.clip_blocks, tokens) if request is not None else None
    with open_release(site.policy, run, "similarity", site.images("calibration"), site_name=site.name, parts=parts) as release:
        if release.stored is not None:
            return release.stored
        grant = release.grant
        stats = (collect_similarity(adapter, site.calibration, token_mode=token_mode, device=site.device)
                 if grant is None else collect_clipped_similarity(adapter, site.calibration, request.clip_blocks,
                                                                  token_mode=token_mode, device=site.device))
        _logger.info("%s: similarity sums over %d images", site.name, stats.images)
        if grant is not None:
            stats = noisy_similarity(stats, parts, grant.site_sigma, grant.noise, tokens)
        return release.keep(encode_similarity(stats))


def statistics_reply(model: nn.Module, site: Site, plan: Plan, token_mode: str, run: RunSpec,
                     priors: Mapping[Span, LinearMap] | None = None, secure: SecureRound | None = None,
                     map_kind: str = "linear") -> Arrays:
    """Exact span sums, or (private run) noisy weighted residual-form sums around the run's priors, of the
    (input, target) pairs of the run's `map_kind` (`ViTAdapter.span_pairs`): the same statistics either way, and
    under ``map: auto`` both kinds' from one pass, in one release (private: one weight per image over both kinds'
    bounds, the shares split evenly between the kinds by the site itself, `kind_span_parts`).
    `secure`: the SecAgg+ round this reply goes into (None: a plain reply, which carries the full noise)."""
    adapter = ViTAdapter(model)
    request = run.privacy
    kinds = collected_kinds(map_kind)
    # the site derives every sensitivity and share itself, from the request's bounds of each kind it releases
    bounds = request.kind_bounds(plan.spans, kinds) if request is not None else None
    if request is not None and (priors is None or set(priors) != set(plan.spans)):
        raise TBAInputError("prior", "a private statistics release needs the run's prior map for every span")
    parts = kind_span_parts(bounds) if bounds is not None else None
    summaries = site.images("calibration", "held-out")
    with open_release(site.policy, run, "statistics", summaries, site_name=site.name, parts=parts, secure=secure) as release:
        if release.stored is not None:
            return release.stored
        per_split = {}
        for split, loader in (("calibration", site.calibration), ("holdout", site.holdout)):
            if loader is None:
                per_split |= {group_name(map_kind, kind, split): {
                    s: (SpanStats if request is None else ClippedSpanSums).zeros(adapter.embed_dim) for s in plan.spans}
                    for kind in kinds}
                continue
            # every kind collected from the same pass (map: auto collects both)
            by_kind = collect_kind_stats(adapter, loader, plan.spans, kinds, token_mode=token_mode, device=site.device) \
                if request is None else collect_clipped_kind_sums(adapter, loader, plan.spans, token_mode=token_mode,
                                                                  bounds=bounds, priors=priors, device=site.device)
            per_split |= {group_name(map_kind, kind, split): sums for kind, sums in by_kind.items()}
        first = per_split[statistics_groups(map_kind)[0]][plan.spans[0]]
        grant = release.grant
        if grant is None:
            _logger.info("%s: span sums over %d calibration and %d held-out images", site.name, first.images,
                         per_split[statistics_groups(map_kind)[1]][plan.spans[0]].images)
            return encode_spans(per_split)
        _logger.info("%s: private span sums over %d calibration images (%d down-weighted to their bounds)", site.name,
                     first.images, first.clipped)
        return release.keep(encode_spans(noisy_spans(per_split, parts, grant.site_sigma, grant.noise)))


def secure_statistics(config: Mapping[str, Any], context: Any, site_context: SiteContext) -> tuple[Arrays, dict[str, float]]:
    """The statistics release under secure aggregation: noisy sums (this site's share of the noise)
    and the fixed-point range of each array, for `secure_aggregation.secure_fit`. The run's prior
    maps travel in the config as text (Flower's legacy FitIns config holds scalars only). What the
    site's own SecAgg+ state shows of the round (participants, reconstruction threshold) bounds the
    noise split it accepts."""
    secure = secure_round(context)
    model = site_model(site_context, config)
    run = run_spec(context.run_id, config, secure)
    request = run.privacy
    if request is None:
        raise PolicyRefusal("privacy.aggregation", "a secure-aggregation round must carry a privacy request with "
                                                   "aggregation 'secure'")
    site = resolve_site(site_context, model, config, "statistics", secure)
    adapter = ViTAdapter(model)
    plan = parse_plan(str(config["plan"]), adapter.num_blocks)
    max_images = int(config["max-images"])
    if sum(site.images("calibration", "held-out").values()) > max_images:
        raise PolicyRefusal("federation.max_images_per_site", f"{site.name} holds more images than the fixed-point "
                                                              f"range allows ({max_images})", "raise max_images_per_site")
    priors = decode_priors(str(config.get("prior-maps", "")), plan.spans, adapter.embed_dim)
    arrays = statistics_reply(model, site, plan, str(config["token-mode"]), run, priors, secure, map_kind(config))
    ranges = secure_ranges(request, plan.spans, max_images, map_kind(config))
    return clamp(arrays, ranges), ranges


def map_kind(config: Mapping[str, Any]) -> str:
    """The run's map kind, as the request's settings carry it (``map``, beside ``token-mode``; checked where used).
    A request without it is of a server that fits linear maps only, so it means ``linear``."""
    return str(config.get("map", "linear"))


def installed_kinds(config: Mapping[str, Any], num_blocks: int) -> str | dict[Span, str]:
    """The kind the maps the server sends are built with: the run's, or under ``map: auto`` each fitted span's
    (``span-maps``, JSON ``{"s->e": kind}``; `decode_maps` checks each kind and that every fitted span has one)."""
    choice = map_kind(config)
    if choice != "auto":
        return choice
    try:
        named = json.loads(str(config.get("span-maps", "")))
        kinds = {parse_plan(span, num_blocks, field="span-maps").spans[0]: str(kind) for span, kind in named.items()}
    except (ValueError, AttributeError, TBAInputError):
        raise TBAInputError("span-maps", "not a JSON object of spans and their map kinds") from None
    return kinds


def probe_reply(model: nn.Module, compressed: nn.Module, site: Site, num_classes: int, run: RunSpec) -> Arrays:
    """Probe sums of the original and the compressed model on this site's calibration images."""
    request = run.privacy
    if request is not None and request.clip_features is None:
        raise TBAInputError("privacy.clip_features", "a private probe release needs a feature clipping bound")
    parts = probe_parts(MODELS, request.clip_features) if request is not None else None
    with open_release(site.policy, run, "probe", site.images("calibration"), site_name=site.name, parts=parts) as release:
        if release.stored is not None:
            return release.stored
        grant = release.grant
        stats = {name: (collect_probe_stats(m, site.calibration, num_classes, device=site.device) if grant is None else
                        collect_clipped_probe_stats(m, site.calibration, num_classes, request.clip_features,
                                                    device=site.device))
                 for name, m in (("original", model), ("compressed", compressed))}
        if grant is not None:
            stats = noisy_probe(stats, parts, grant.site_sigma, grant.noise)
        return release.keep(encode_probe(stats))


def accuracy_reply(model: nn.Module, compressed: nn.Module, site: Site, heads: Mapping[str, ProbeHead],
                   run: RunSpec) -> dict[str, int]:
    """Correct counts on this site's held-out images: integers, no per-image outcome (noisy under DP)."""
    if site.holdout is None:
        raise TBAInputError("data.holdout_fraction", f"{site.name} holds no images out to evaluate on",
                            "set data.holdout_fraction above 0")
    parts = accuracy_parts() if run.privacy is not None else None
    with open_release(site.policy, run, "accuracy", site.images("held-out"), site_name=site.name, parts=parts) as release:
        if release.stored is None:
            original, total = accuracy(model, heads["original"], site.holdout, device=site.device)
            compressed_correct, _ = accuracy(compressed, heads["compressed"], site.holdout, device=site.device)
            counts = {"original_correct": original, "compressed_correct": compressed_correct, "total": total}
            grant = release.grant
            if grant is not None:
                counts = noisy_counts(counts, parts, grant.site_sigma, grant.noise)
            release.keep({key: np.asarray(value) for key, value in counts.items()})
            return counts
        return {key: int(value) for key, value in release.stored.items()}


def install(model: nn.Module, site: Site, maps: Mapping[Span, LinearMap], report: dict) -> str:
    """Build the compressed model, save it atomically, return the sha256 of the maps file on disk."""
    if site.output is None:
        raise TBAInputError("site.output", "this site has no output directory")
    build_compressed(model, maps)  # proves the maps fit this site's model before anything is written
    report = {**report, "site": {"name": site.name, "profile": site.profile}}
    folder = write_compressed(site.output / "compressed", maps, manifest(report, maps), overwrite=True,
                              files={"report.json": json.dumps(report, indent=2) + "\n"})
    digest = hashlib.sha256((folder / MAPS_FILE).read_bytes()).hexdigest()
    _logger.info("%s: installed %s in %s (maps sha256 %s)", site.name, report.get("plan"), folder, digest[:12])
    return digest


def answer(msg: Message, model: nn.Module, site: Site, run: RunSpec) -> dict[str, Any]:
    """The records of a site's reply to `msg`, by its action (the message type after the dot): the one routing
    of requests to the replies above, for the ClientApp (`serve`) and for tests that stand in for its data."""
    config = msg.content.config_records["config"]
    action = msg.metadata.message_type.split(".", 1)[1]
    if action == "similarity":
        return {"similarity": to_record(similarity_reply(model, site, str(config["token-mode"]), run))}
    plan = parse_plan(str(config["plan"]), len(model.blocks))
    if action == "statistics":
        priors = decode_priors(str(config["prior-maps"]), plan.spans, model.embed_dim) if config.get("prior-maps") else None
        return {"statistics": to_record(statistics_reply(model, site, plan, str(config["token-mode"]), run, priors,
                                                         map_kind=map_kind(config)))}
    identity = parse_plan(str(config["identity-spans"]), len(model.blocks)).spans if config["identity-spans"] else ()
    maps = decode_maps(from_record(msg.content.array_records["maps"]), plan.spans, identity, model.embed_dim,
                       map_kind=installed_kinds(config, len(model.blocks)))
    compressed = build_compressed(model, maps)
    if action == "install":
        return {"install": ConfigRecord({"checksum": install(model, site, maps, json.loads(str(config["report"])))})}
    if action == "probe":
        return {"probe": to_record(probe_reply(model, compressed, site, int(config["num-classes"]), run))}
    if action == "accuracy":
        heads = decode_heads(from_record(msg.content.array_records["heads"]), int(model.num_features),
                             int(config["num-classes"]))
        return {"accuracy": MetricRecord(accuracy_reply(model, compressed, site, heads, run))}
    raise TBAInputError("message_type", f"{msg.metadata.message_type!r} is not a tba-fed request")


def serve(msg: Message, context: Context, site_context: SiteContext) -> Message:
    """A request the ClientApp routes here: its profile and model admitted before any weight is loaded, the
    site's policy before any image is read (`resolve_site`), then `answer`."""
    config = msg.content.config_records["config"]
    action = msg.metadata.message_type.split(".", 1)[1]
    model = site_model(site_context, config)
    site = resolve_site(site_context, model, config, action if action in RELEASES else None)
    records = answer(msg, model, site, run_spec(msg.metadata.run_id, dict(config)))
    return Message(RecordDict({"meta": ConfigRecord({"site": site.name, **echo(msg)}), **records}), reply_to=msg)
