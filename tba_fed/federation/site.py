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
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..adapter import ViTAdapter
from ..calibrate import collect_similarity, collect_span_stats
from ..checkpoint import MAPS_FILE, manifest, write_compressed
from ..compressed import build_compressed
from ..config import DataConfig, ModelConfig
from ..data import build_dataset, calibration_split, make_loader
from ..errors import TBAInputError
from ..models import create_model
from ..partition import partition, site_split
from ..plan import Plan, Span
from ..probe import ProbeHead, accuracy, collect_probe_stats
from ..solver import LinearMap
from ..stats import SpanStats
from .config import load_federated_config, load_site_config
from .wire import Arrays, encode_probe, encode_similarity, encode_spans

_logger = logging.getLogger(__name__)


@dataclass
class Site:
    """The images one site calibrates on; they never leave this object."""

    name: str
    calibration: DataLoader
    holdout: DataLoader | None
    output: Path | None
    device: str = "cpu"


@functools.lru_cache(maxsize=2)
def cached_model(model_json: str) -> nn.Module:
    """Load the base model once per site process (simulation actors are reused across rounds)."""
    return create_model(ModelConfig.model_validate_json(model_json))


def simulated_indices(data: DataConfig, targets: np.ndarray, num_sites: int, site: int, scheme: str, *,
                      alpha: float, shards_per_site: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Site `site`'s calibration and held-out indices in a simulation.

    The pool is the same seeded sample of ``data.num_images`` images a centralised run would use;
    it is partitioned across sites, then each site keeps ``holdout_fraction`` of its share out of the fit.
    """
    rng = np.random.default_rng(data.seed)
    pool = rng.permutation(len(targets))[: min(data.num_images, len(targets))]
    parts = partition(targets[pool], num_sites, scheme=scheme, alpha=alpha, shards_per_site=shards_per_site,
                      seed=seed)
    calibration, holdout = site_split(pool[parts[site]], data.holdout_fraction, seed=seed + site)
    return calibration, holdout


def resolve_site(node_config: Mapping[str, Any], run_config: Mapping[str, Any], model: nn.Module) -> Site:
    """Deployment: the site's own YAML (``site-config``); simulation: its partition of the run's data."""
    if "site-config" in node_config:
        config = load_site_config(Path(str(node_config["site-config"])))
        dataset = build_dataset(config.data, model)
        calibration, holdout = calibration_split(dataset, config.data)
        return Site(config.name, make_loader(calibration, config.data),
                    make_loader(holdout, config.data) if len(holdout) else None, config.output, config.device)
    if "partition-id" not in node_config:
        raise TBAInputError("node-config", "neither site-config nor partition-id is set",
                            "start the SuperNode with --node-config 'site-config=\"/path/site.yaml\"'")
    run = load_federated_config(Path(str(run_config["config-path"])))
    site = int(node_config["partition-id"])
    num_sites = int(node_config.get("num-partitions", run.federation.num_sites))
    dataset = build_dataset(run.data, model)
    p = run.federation.partition
    calibration, holdout = simulated_indices(run.data, np.asarray(dataset.targets), num_sites, site, p.scheme,
                                             alpha=p.alpha, shards_per_site=p.shards_per_site, seed=p.seed)
    output = run.output.with_name(run.output.name + "-sites") / f"site-{site}"
    return Site(f"site-{site}", make_loader(Subset(dataset, calibration.tolist()), run.data),
                make_loader(Subset(dataset, holdout.tolist()), run.data) if len(holdout) else None, output, run.device)


def similarity_reply(model: nn.Module, site: Site, token_mode: str) -> Arrays:
    stats = collect_similarity(ViTAdapter(model), site.calibration, token_mode=token_mode, device=site.device)
    _logger.info("%s: similarity sums over %d images", site.name, stats.images)
    return encode_similarity(stats)


def statistics_reply(model: nn.Module, site: Site, plan: Plan, token_mode: str) -> Arrays:
    adapter = ViTAdapter(model)
    calibration = collect_span_stats(adapter, site.calibration, plan.spans, token_mode=token_mode, device=site.device)
    holdout = (collect_span_stats(adapter, site.holdout, plan.spans, token_mode=token_mode, device=site.device)
               if site.holdout is not None else {s: SpanStats.zeros(adapter.embed_dim) for s in plan.spans})
    _logger.info("%s: span sums over %d calibration and %d held-out images", site.name,
                 calibration[plan.spans[0]].images, holdout[plan.spans[0]].images)
    return encode_spans({"calibration": calibration, "holdout": holdout})


def probe_reply(model: nn.Module, compressed: nn.Module, site: Site, num_classes: int) -> Arrays:
    """Probe sums of the original and the compressed model on this site's calibration images."""
    return encode_probe({"original": collect_probe_stats(model, site.calibration, num_classes, device=site.device),
                         "compressed": collect_probe_stats(compressed, site.calibration, num_classes, device=site.device)})


def accuracy_reply(model: nn.Module, compressed: nn.Module, site: Site, heads: Mapping[str, ProbeHead]) -> dict[str, int]:
    """Correct counts on this site's held-out images: integers, no per-image outcome."""
    if site.holdout is None:
        raise TBAInputError("data.holdout_fraction", f"{site.name} has no held-out images to evaluate on")
    original, total = accuracy(model, heads["original"], site.holdout, device=site.device)
    compressed_correct, _ = accuracy(compressed, heads["compressed"], site.holdout, device=site.device)
    return {"original_correct": original, "compressed_correct": compressed_correct, "total": total}


def install(model: nn.Module, site: Site, maps: Mapping[Span, LinearMap], report: dict) -> str:
    """Build the compressed model, save it atomically, return the sha256 of the maps file on disk."""
    if site.output is None:
        raise TBAInputError("site.output", "this site has no output directory")
    build_compressed(model, maps)  # proves the maps fit this site's model before anything is written
    folder = write_compressed(site.output / "compressed", maps, manifest(report, maps), overwrite=True,
                              files={"report.json": json.dumps(report, indent=2) + "\n"})
    digest = hashlib.sha256((folder / MAPS_FILE).read_bytes()).hexdigest()
    _logger.info("%s: installed %s in %s (maps sha256 %s)", site.name, report.get("plan"), folder, digest[:12])
    return digest
