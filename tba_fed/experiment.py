"""The paper's Table-1 protocol: accuracy of many approximations, several seeds, one or more datasets.

Per seed: one statistics pass fits every approximation's maps on ``calibration_images`` training images;
a closed-form ridge probe (on the final-norm class token) is fitted for the original and for every
compressed variant on ``probe_train_images`` and scored on ``probe_test_images`` test images. Every
approximation runs with each map kind of ``maps`` (``linear``, ``folded``; ``auto`` picks per span the kind
with the lower error on ``holdout_images`` further training images, from the same pass) and as "identity"
(blocks simply dropped) so the value of each map is visible.

Variants share the original's block outputs: a variant s->e restarts from the cached output of block s,
so only the blocks after the span are recomputed (equal to the compressed model's forward, see tests).
Finished rows are appended to ``rows.jsonl``; a rerun skips the seeds whose rows are all there. Each row
carries the key of what its numbers depend on (the model's weights, the dataset's selection, the protocol's
sizes and settings), so a rerun reuses only rows of its own configuration and refuses any other line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .adapter import ViTAdapter
from .benchmark import MAX_REPEATS, eager_latency
from .calibrate import collect_kind_stats
from .compressed import build_compressed, count_parameters, parameter_report
from .config import (MAX_BATCH, MAX_IMAGES, DataConfig, Device, ModelConfig, Seed, _Section, check_device, load_json,
                     read_yaml, validate)
from .data import build_dataset
from .errors import TBAInputError
from .fileio import open_output_dir, owned_files, writable_location, write_owned
from .logs import logged_progress
from .models import create_model, weights_sha256
from .pipeline import SpanFit, solve_kinds, span_kinds
from .plan import Plan, Span, parse_plan
from .probe import ProbeStats, solve_probe
from .report import accuracy_png, latency_png
from .solver import LinearMap

_logger = logging.getLogger(__name__)

PAPER_APPROXIMATIONS = ("0->1", "3->4", "9->10", "10->11", "2->4", "9->11", "1->2, 4->5", "2->5", "7->10", "1->5")
KIND = "experiment"
ROWS = "rows.jsonl"
ACCURACY_PLOT = "accuracy_vs_params.png"
LATENCY_FILE = "latency.json"
LATENCY_PLOT = "latency_vs_blocks.png"


class DatasetSpec(_Section):
    name: str
    train: DataConfig
    test: DataConfig


class LatencyConfig(_Section):
    """The eager CPU latency of one compressed model per number of blocks removed, timed against the original."""

    batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    repeats: int = Field(10, ge=1, le=MAX_REPEATS)


class ExperimentConfig(_Section):
    model: ModelConfig
    datasets: list[DatasetSpec] = Field(min_length=1)
    approximations: list[str] = Field(default_factory=lambda: list(PAPER_APPROXIMATIONS), min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    calibration_images: int = Field(500, ge=1, le=MAX_IMAGES)
    probe_train_images: int = Field(3000, ge=1, le=MAX_IMAGES)
    probe_test_images: int = Field(1000, ge=1, le=MAX_IMAGES)
    identity_baseline: bool = True
    maps: list[Literal["linear", "folded", "auto"]] = Field(default_factory=lambda: ["linear"], min_length=1)
    holdout_images: int = Field(0, ge=0, le=MAX_IMAGES)
    token_mode: str = "all"
    bias: bool = True
    ridge: float = Field(0.0, ge=0)
    probe_ridge: float = Field(1e-6, ge=0)
    batch_size: int = Field(50, ge=1, le=MAX_BATCH)
    device: Device = "cpu"
    output: Path = Path("outputs/experiment")
    latency: LatencyConfig | None = Field(LatencyConfig(), description=f"{LATENCY_FILE} and {LATENCY_PLOT}; null: "
                                                                        "not measured")

    @model_validator(mode="after")
    def _distinct_datasets(self) -> ExperimentConfig:
        names = [d.name for d in self.datasets]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise TBAInputError("datasets", f"the name {twice[0]!r} is given to two datasets: their rows and columns "
                                            "would be mixed", "give each dataset its own name")
        if "auto" in self.maps and self.holdout_images == 0:
            raise TBAInputError("holdout_images", "maps: auto picks each span's kind by its held-out error",
                                "set holdout_images (e.g. 100) or remove auto from maps")
        return self


def load_experiment_config(path: Path) -> ExperimentConfig:
    return validate(ExperimentConfig, read_yaml(path))


@dataclass(frozen=True)
class Variant:
    """One row of the table: a plan and whether its spans get fitted maps or are simply dropped."""

    plan: Plan | None  # None: the original model
    kind: str  # "original" | "identity" | a map choice: "linear", "folded", "auto"

    @property
    def label(self) -> str:
        return "original" if self.plan is None else f"{self.plan} ({self.kind})"

    @property
    def approximation(self) -> str:
        return "original" if self.plan is None else str(self.plan)


def variant_features(adapter: ViTAdapter, states: list[torch.Tensor], variant: Variant,
                     maps: Mapping[Span, LinearMap]) -> torch.Tensor:
    """Pre-logits features of a compressed variant, restarting from the cached original states (`states[k]`:
    block k's input, the embedding then each block's output). Each span by its map's kind: dropped, a linear map
    on x_s, or a folded one (block s rerun in halves, h_s + T(m_s), as the folded block computes it)."""
    model = adapter.model
    if variant.plan is None:
        x = states[-1]
    else:
        spans = variant.plan.spans
        x = states[spans[0].start]  # block s's input
        for i, span in enumerate(spans):
            linear_map = maps[span]
            if linear_map.kind == "folded":
                h, m = adapter.block_halves(span.start, x)
                x = h + linear_map.apply(m.double()).to(m.dtype)
            else:
                x = states[span.start + 1] if i == 0 else adapter.run_blocks(x, span.start, span.start + 1)
                x = x if linear_map.kind == "identity" else linear_map.apply(x.double()).to(x.dtype)
            x = adapter.run_blocks(x, span.end + 1, spans[i + 1].start if i + 1 < len(spans) else adapter.num_blocks)
    return model.forward_head(model.norm(x), pre_logits=True)


def original_states(adapter: ViTAdapter, images: torch.Tensor) -> list[torch.Tensor]:
    """The embedding then every block's output of the original model: what `variant_features` restarts from."""
    return [adapter.embed(images), *adapter.iter_block_outputs(images, adapter.num_blocks - 1)]


def _sample(dataset, count: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(len(dataset))
    if exclude is not None:
        order = order[~np.isin(order, exclude)]
    if count > len(order):
        raise TBAInputError("experiment", f"asked for {count} images, the split has {len(order)}")
    return order[:count]


def _probe_pass(adapter: ViTAdapter, batches: Iterable, variants: list[Variant], maps: Mapping[str, Mapping[Span, LinearMap]],
                num_classes: int, heads: dict[str, object] | None, device: str) -> dict[str, object]:
    """One pass over labelled images: probe statistics (heads None) or correct counts (heads given)."""
    results: dict[str, object] = {}
    dtype = next(adapter.model.parameters()).dtype
    with torch.inference_mode():
        for images, labels in batches:
            states = original_states(adapter, images.to(device=device, dtype=dtype))
            computed: dict[tuple, torch.Tensor] = {}  # an auto variant whose spans all chose one kind is that variant
            for variant in variants:
                chosen = maps.get(variant.label, {})
                same = (variant.approximation, tuple(m.kind for _, m in sorted(chosen.items())))
                if same not in computed:
                    computed[same] = variant_features(adapter, states, variant, chosen).cpu()
                feats = computed[same]
                if heads is None:
                    stats = results.setdefault(variant.label, ProbeStats.zeros(feats.shape[1], num_classes))
                    stats.update(feats, labels)  # type: ignore[union-attr]
                else:
                    hits = int((heads[variant.label].predict(feats) == torch.as_tensor(labels)).sum())  # type: ignore[attr-defined]
                    results[variant.label] = int(results.get(variant.label, 0)) + hits  # type: ignore[arg-type]
    return results


def run_seed(config: ExperimentConfig, model: nn.Module, spec: DatasetSpec, seed: int, variants: list[Variant],
             key: str) -> list[dict]:
    adapter = ViTAdapter(model)
    train, test = build_dataset(spec.train, model), build_dataset(spec.test, model)
    num_classes = int(max(np.max(train.targets), np.max(test.targets)) + 1)
    calibration = _sample(train, config.calibration_images, seed)
    probe_train = _sample(train, config.probe_train_images, seed + 10_000, exclude=calibration)
    probe_test = _sample(test, config.probe_test_images, seed + 20_000)
    holdout = _sample(train, config.holdout_images, seed + 30_000, exclude=np.concatenate([calibration, probe_train])) \
        if config.holdout_images else None

    def loader(dataset, idx: np.ndarray) -> DataLoader:
        return DataLoader(Subset(dataset, idx.tolist()), batch_size=config.batch_size)

    spans = sorted({s for v in variants if v.plan is not None for s in v.plan.spans})
    # linear always: its Σ‖x_e‖² is the denominator that makes every kind's error comparable
    kinds = ("linear", "folded") if {"folded", "auto"} & set(config.maps) else ("linear",)
    _logger.info("%s seed %d: fitting %d spans (%s) on %d calibration images", spec.name, seed, len(spans),
                 ", ".join(kinds), len(calibration))
    progress = f"{spec.name} seed {seed}: "
    stats = collect_kind_stats(adapter, logged_progress(loader(train, calibration), progress + "calibration", _logger),
                               spans, kinds, token_mode=config.token_mode, device=config.device)
    held = None if holdout is None else collect_kind_stats(
        adapter, logged_progress(loader(train, holdout), progress + "held-out", _logger), spans, kinds,
        token_mode=config.token_mode, device=config.device)
    fits: dict[str, dict[Span, SpanFit]] = {choice: solve_kinds(stats, held, map_kind=choice, bias=config.bias,
                                                                ridge=config.ridge) for choice in config.maps}
    for choice, per_span in fits.items():
        for span, fit in per_span.items():
            _logger.info("%s seed %d: %s map of span %s fitted, calibration relative error %.4g (dropping its blocks: "
                         "%.4g)", spec.name, seed, choice, span, fit.calibration.relative_error,
                         fit.identity_calibration.relative_error)
    identity = {span: LinearMap.identity(adapter.embed_dim) for span in spans}
    maps = {v.label: {s: identity[s] if v.kind == "identity" else fits[v.kind][s].map for s in v.plan.spans}
            for v in variants if v.plan is not None}
    _logger.info("%s seed %d: probe statistics of %d variants on %d images, then accuracy on %d test images",
                 spec.name, seed, len(variants), len(probe_train), len(probe_test))

    def passing(dataset, idx: np.ndarray, what: str) -> Iterable:
        desc = f"{spec.name} seed {seed}: {what}"
        return logged_progress(tqdm(loader(dataset, idx), desc=desc, leave=False, disable=None), desc, _logger)

    probe_stats = _probe_pass(adapter, passing(train, probe_train, "probe fit"), variants, maps, num_classes, None,
                              config.device)
    heads = {label: solve_probe(s, ridge=config.probe_ridge) for label, s in probe_stats.items()}
    correct = _probe_pass(adapter, passing(test, probe_test, "probe test"), variants, maps, num_classes, heads,
                          config.device)
    rows = []
    for variant in variants:
        row = {"key": key, "dataset": spec.name, "seed": seed, "approximation": variant.approximation,
               "kind": variant.kind, "accuracy": correct[variant.label] / len(probe_test),
               "calibration_images": len(calibration), "probe_train_images": len(probe_train),
               "probe_test_images": len(probe_test)}
        if variant.plan is not None:
            chosen = {s: fits[config.maps[0] if variant.kind == "identity" else variant.kind][s] for s in variant.plan.spans}
            report = parameter_report(model, variant.plan, bias=config.bias, map_kind=span_kinds(chosen)
                                      if variant.kind != "identity" else {s: "identity" for s in variant.plan.spans})
            # Σ‖x_e − x̂_e‖² / Σ‖x_e‖² for every kind (a folded fit's own relative error divides by Σ‖x_e − h_s‖²)
            row |= {"params_removed": report.removed, "paper_params_removed": report.paper_removed,
                    "calibration_relative_error": float(np.mean([
                        (fit.identity_calibration if variant.kind == "identity" else fit.calibration).sse
                        / max(float(stats["linear"][s].sum_yy), 1e-300) for s, fit in chosen.items()]))}
            if variant.kind == "auto":
                row["span_kinds"] = {str(s): fit.map.kind for s, fit in chosen.items()}
                row["holdout_errors"] = {str(s): fit.choice.holdout_errors for s, fit in chosen.items()
                                         if fit.choice is not None}
        else:
            row |= {"params_removed": 0, "paper_params_removed": 0, "params": count_parameters(model)}
        rows.append(row)
    return rows


def check_experiment(config: ExperimentConfig) -> None:
    """What can be checked before any work: the device is on this machine, and the output directory is new,
    empty or this tool's experiment, and writable."""
    check_device(config.device)
    owned_files(config.output, KIND)
    writable_location(config.output, "output")


def rows_key(config: ExperimentConfig, spec: DatasetSpec, weights: str) -> str:
    """sha256 of what a row's numbers depend on: the model's weights (`weights_sha256`) and architecture, the
    dataset's selection (its sources with absolute paths; not how they are batched) and the protocol's sizes
    and settings. Not the seeds nor the approximations: each row names its own."""
    def selection(data: DataConfig) -> dict:
        chosen = data.model_dump(mode="json", exclude={"batch_size", "num_workers", "download"})
        return {**chosen, "path": None if data.path is None else str(data.path.resolve())}

    identity = {"weights": weights, "model": config.model.model_dump(mode="json", include={"name", "kwargs"}),
                "dataset": {"name": spec.name, "train": selection(spec.train), "test": selection(spec.test)},
                **config.model_dump(mode="json", include={"calibration_images", "probe_train_images",
                                                          "probe_test_images", "token_mode", "bias", "ridge",
                                                          "probe_ridge"}),
                **({"holdout_images": config.holdout_images} if config.holdout_images else {})}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def run_experiment(config: ExperimentConfig) -> Path:
    """Run (or resume) the protocol; returns the output directory with rows.jsonl, table.md, table.csv, summary.json
    and accuracy_vs_params.png (accuracy against the exact parameters removed); unless latency is null, latency.json
    and latency_vs_blocks.png (measured and FLOP-theoretical speed-up against the blocks removed).
    Refused before any work: a device this machine lacks, an output directory holding anything but this
    tool's experiment; before any seed: a line of rows.jsonl that is not a row of this configuration."""
    check_device(config.device)
    files = open_output_dir(config.output, KIND, appended=[ROWS])
    model = create_model(config.model)
    plans = [parse_plan(text, len(model.blocks), field="approximations") for text in config.approximations]
    variants = [Variant(None, "original")] + [Variant(p, kind) for kind in config.maps for p in plans]
    if config.identity_baseline:
        variants += [Variant(p, "identity") for p in plans]
    weights = weights_sha256(model)
    keys = {spec.name: rows_key(config, spec, weights) for spec in config.datasets}
    rows_path = config.output / ROWS
    latest = {_cell(r): r for r in read_rows(rows_path, keys)}  # a seed redone after an interruption: its last rows

    def cells(name: str, seed: int) -> list[tuple]:
        return [(name, seed, v.approximation, v.kind) for v in variants]

    for spec in config.datasets:
        for seed in tqdm(config.seeds, desc=f"{spec.name}: seeds", disable=None):
            if all(cell in latest for cell in cells(spec.name, seed)):
                _logger.info("%s seed %d: already done, skipped", spec.name, seed)
                continue
            rows = run_seed(config, model, spec, seed, variants, keys[spec.name])
            with open(rows_path, "a") as handle:  # a seed counts as done only once all its rows are there
                handle.write("".join(json.dumps(r) + "\n" for r in rows))
                handle.flush()
                os.fsync(handle.fileno())
            latest |= {_cell(r): r for r in rows}
            _logger.info("%s seed %d: original %.4f", spec.name, seed, rows[0]["accuracy"])
    rows = [latest[cell] for spec in config.datasets for seed in config.seeds for cell in cells(spec.name, seed)]
    summary = summarise(rows)
    outputs: dict[str, str | bytes] = {"table.md": table_markdown(rows, config), "table.csv": table_csv(rows),
                                       "summary.json": json.dumps(summary, indent=2) + "\n",
                                       ACCURACY_PLOT: accuracy_png(summary)}
    if config.latency is not None:
        latency = measure_latency(model, plans, config.maps[0], config.bias, config.latency)
        outputs |= {LATENCY_FILE: json.dumps(latency, indent=2) + "\n", LATENCY_PLOT: latency_png(latency)}
    write_owned(config.output, KIND, files, outputs)
    return config.output


def measure_latency(model: nn.Module, plans: Iterable[Plan], map_choice: str, bias: bool,
                    settings: LatencyConfig) -> dict:
    """For each number of blocks removed, the first of `plans` that removes that many, built with maps of the run's
    first map kind (``auto``: linear, the costlier of its two; the maps' values do not change the time) and timed
    against `model` (`eager_latency`): one row each, its measured speed-up beside the FLOP-theoretical one."""
    kind = "folded" if map_choice == "folded" else "linear"
    dim = ViTAdapter(model).embed_dim
    chosen: dict[int, Plan] = {}
    for plan in plans:
        chosen.setdefault(sum(len(span.removed) for span in plan.spans), plan)
    sections = {}
    for blocks, plan in sorted(chosen.items()):
        maps = {span: LinearMap(torch.eye(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
                                if bias else None, kind) for span in plan.spans}
        sections[blocks] = eager_latency(model, build_compressed(model, maps), batch_sizes=(settings.batch_size,),
                                         repeats=settings.repeats)
    rows = [{"blocks_removed": blocks, "approximation": str(chosen[blocks]), "map": kind, "flops": section["flops"],
             **section["batches"][0], "machine": section["machine"]} for blocks, section in sections.items()]
    first = next(iter(sections.values()))
    return {"runtime": first["runtime"], "speedup": first["speedup"], "settings": first["settings"], "rows": rows}


class Row(BaseModel):
    """One line of rows.jsonl, as run_seed writes it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    key: str
    dataset: str
    seed: int
    approximation: str
    kind: Literal["original", "linear", "folded", "auto", "identity"]
    accuracy: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    calibration_images: int = Field(ge=1)
    probe_train_images: int = Field(ge=1)
    probe_test_images: int = Field(ge=1)
    params_removed: int
    paper_params_removed: int
    params: int | None = None
    calibration_relative_error: float | None = Field(None, allow_inf_nan=False)
    span_kinds: dict[str, Literal["linear", "folded"]] | None = None  # an auto row: each span's chosen kind
    holdout_errors: dict[str, dict[str, float]] | None = None  # an auto row: each span's held-out error per kind


_cell = operator.itemgetter("dataset", "seed", "approximation", "kind")  # a row's place in the table


def read_rows(path: Path, keys: Mapping[str, str]) -> list[dict]:
    """The rows of rows.jsonl in file order; `keys`: this configuration's rows_key per dataset name. A last line
    without its newline is what a run interrupted while appending leaves: it is cut off the file (with a
    warning) and its seed redone. Any other line that is not a row of this configuration is refused, naming
    the file and the line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise TBAInputError("output", f"{path} cannot be read ({err.strerror})") from None
    lines = data.split(b"\n")
    torn = lines.pop()
    rows = [_row(path, number, line, keys) for number, line in enumerate(lines, 1)]
    if torn:  # cut only once every complete line is known to be a row: a refused file stays as it was
        _logger.warning("%s line %d: incomplete (a run interrupted while writing it): cut off, its seed is redone",
                        path, len(lines) + 1)
        os.truncate(path, len(data) - len(torn))
    return rows


def _row(path: Path, number: int, line: bytes, keys: Mapping[str, str]) -> dict:
    where, fix = f"{path} line {number}", "remove that line to redo its seed, or give the run another output directory"
    try:
        row = load_json(line)
    except (ValueError, RecursionError) as err:
        raise TBAInputError("output", f"{where} is not a JSON row ({type(err).__name__}: {str(err)[:120]})", fix) from None
    if not isinstance(row, dict):
        raise TBAInputError("output", f"{where} is not a row (a JSON object)", fix)
    try:
        Row.model_validate(row)
    except ValidationError as err:
        first = err.errors()[0]
        raise TBAInputError("output", f"{where}: {'.'.join(map(str, first['loc'])) or 'row'}: {first['msg']}",
                            fix) from None
    if keys.get(row["dataset"]) != row["key"]:
        raise TBAInputError("output", f"{where} holds a row of another configuration (dataset {row['dataset']!r}: other "
                                      "model weights, data selection or protocol settings)",
                            "give this configuration another output directory, or rerun the one that wrote it")
    return row


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (dataset, approximation, kind), with the change relative to the original."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["approximation"], row["kind"]), []).append(row)
    originals = {d: float(np.mean([r["accuracy"] for r in g])) for (d, a, _), g in groups.items() if a == "original"}
    out = []
    for (dataset, approx, kind), group in groups.items():
        acc = np.array([r["accuracy"] for r in group]) * 100
        out.append({"dataset": dataset, "approximation": approx, "kind": kind, "seeds": len(group),
                    "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=0)),
                    "relative_change": float(acc.mean() / (originals[dataset] * 100) - 1) * 100,
                    "params_removed": group[0]["params_removed"], "paper_params_removed": group[0]["paper_params_removed"],
                    "calibration_relative_error": group[0].get("calibration_relative_error")})
    return out


def table_markdown(rows: list[dict], config: ExperimentConfig) -> str:
    """The paper's layout: one row per approximation, params removed, then per dataset mean ± std (rel. %)."""
    summary = summarise(rows)
    datasets = [d.name for d in config.datasets]
    cell = {(s["dataset"], s["approximation"], s["kind"]): s for s in summary}
    keys = {(s["approximation"], s["kind"]) for s in summary if s["approximation"] != "original"}
    first = {key: next(cell[(d, *key)] for d in datasets if (d, *key) in cell) for key in keys}  # its parameter counts
    head = "| Approx. | Map | Params. (paper conv.) | Params. (exact) | " + " | ".join(datasets) + " |"
    lines = [head, "|---" * (4 + len(datasets)) + "|"]

    def rank(key: tuple[str, str]) -> tuple:
        position = config.approximations.index(key[0]) if key[0] in config.approximations else len(config.approximations)
        return -first[key]["paper_params_removed"], position, key[1] != "linear"

    def fmt(s: dict | None, change: bool = True) -> str:
        if s is None:
            return ""
        text = f"{s['accuracy_mean']:.2f} ± {s['accuracy_std']:.2f}"
        return text + (f" ({s['relative_change']:+.2f}%)" if change else "")

    for approx, kind in sorted(keys, key=rank):
        params = first[(approx, kind)]
        lines.append(f"| {approx} | {kind} | -{params['paper_params_removed'] / 1e6:.2f}M | -{params['params_removed']:,} | "
                     + " | ".join(fmt(cell.get((d, approx, kind))) for d in datasets) + " |")
    if any(s["approximation"] == "original" for s in summary):
        params = next(r["params"] for r in rows if r["approximation"] == "original")
        lines.append(f"| original | | {params / 1e6:.2f}M | {params:,} | "
                     + " | ".join(fmt(cell.get((d, "original", "original")), change=False) for d in datasets) + " |")
    seeds = sorted({r["seed"] for r in rows})
    note = (f"\nAccuracy (%) of a closed-form ridge probe on the final-norm class token, mean ± std over seeds {seeds}; "
            f"in brackets the change relative to the original. {config.calibration_images} calibration images, "
            f"probe fitted on {config.probe_train_images} and tested on {config.probe_test_images} images per seed. "
            "Map `linear`: TBA's fitted map; `folded`: the map folded into block s's MLP (zero added parameters); "
            "`auto`: per span the kind with the lower held-out error (its parameters: the first seed's choices); "
            "`identity`: the blocks simply dropped.\n")
    return "\n".join(lines) + "\n" + note


def table_csv(rows: list[dict]) -> str:
    summary = summarise(rows)
    keys = list(summary[0]) if summary else []
    return "\n".join([",".join(keys)] + [",".join(json.dumps(s[k]) for k in keys) for s in summary]) + "\n"
