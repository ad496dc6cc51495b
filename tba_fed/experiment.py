"""The paper's Table-1 protocol: accuracy of many approximations, several seeds, one or more datasets.

Per seed: one statistics pass fits every approximation's maps on ``calibration_images`` training images;
a closed-form ridge probe (on the final-norm class token) is fitted for the original and for every
compressed variant on ``probe_train_images`` and scored on ``probe_test_images`` test images. Every
variant also runs as "identity" (blocks simply dropped) so the value of the linear map is visible.

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
from .calibrate import collect_span_stats
from .compressed import count_parameters, parameter_report
from .config import (MAX_BATCH, MAX_IMAGES, DataConfig, Device, ModelConfig, Seed, _Section, check_device, load_json,
                     read_yaml, validate)
from .data import build_dataset
from .errors import TBAInputError
from .fileio import open_output_dir, owned_files, writable_location, write_owned
from .logs import logged_progress
from .models import create_model, weights_sha256
from .pipeline import solve_plan
from .plan import Plan, Span, parse_plan
from .probe import ProbeStats, solve_probe
from .report import accuracy_png
from .solver import LinearMap

_logger = logging.getLogger(__name__)

PAPER_APPROXIMATIONS = ("0->1", "3->4", "9->10", "10->11", "2->4", "9->11", "1->2, 4->5", "2->5", "7->10", "1->5")
KIND = "experiment"
ROWS = "rows.jsonl"
ACCURACY_PLOT = "accuracy_vs_params.png"


class DatasetSpec(_Section):
    name: str
    train: DataConfig
    test: DataConfig


class ExperimentConfig(_Section):
    model: ModelConfig
    datasets: list[DatasetSpec] = Field(min_length=1)
    approximations: list[str] = Field(default_factory=lambda: list(PAPER_APPROXIMATIONS), min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    calibration_images: int = Field(500, ge=1, le=MAX_IMAGES)
    probe_train_images: int = Field(3000, ge=1, le=MAX_IMAGES)
    probe_test_images: int = Field(1000, ge=1, le=MAX_IMAGES)
    identity_baseline: bool = True
    token_mode: str = "all"
    bias: bool = True
    ridge: float = Field(0.0, ge=0)
    probe_ridge: float = Field(1e-6, ge=0)
    batch_size: int = Field(50, ge=1, le=MAX_BATCH)
    device: Device = "cpu"
    output: Path = Path("outputs/experiment")

    @model_validator(mode="after")
    def _distinct_datasets(self) -> ExperimentConfig:
        names = [d.name for d in self.datasets]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise TBAInputError("datasets", f"the name {twice[0]!r} is given to two datasets: their rows and columns "
                                            "would be mixed", "give each dataset its own name")
        return self


def load_experiment_config(path: Path) -> ExperimentConfig:
    return validate(ExperimentConfig, read_yaml(path))


@dataclass(frozen=True)
class Variant:
    """One row of the table: a plan and whether its spans get fitted maps or are simply dropped."""

    plan: Plan | None  # None: the original model
    kind: str  # "original" | "linear" | "identity"

    @property
    def label(self) -> str:
        return "original" if self.plan is None else f"{self.plan} ({self.kind})"

    @property
    def approximation(self) -> str:
        return "original" if self.plan is None else str(self.plan)


def variant_features(adapter: ViTAdapter, outputs: list[torch.Tensor], variant: Variant,
                     maps: dict[Span, LinearMap]) -> torch.Tensor:
    """Pre-logits features of a compressed variant, restarting from the cached original block outputs."""
    model = adapter.model
    if variant.plan is None:
        x = outputs[-1]
    else:
        spans = variant.plan.spans
        x = outputs[spans[0].start]
        for i, span in enumerate(spans):
            x = x if variant.kind == "identity" else maps[span].apply(x.double()).to(x.dtype)
            stop = spans[i + 1].start + 1 if i + 1 < len(spans) else adapter.num_blocks
            x = adapter.run_blocks(x, span.end + 1, stop)
    return model.forward_head(model.norm(x), pre_logits=True)


def _sample(dataset, count: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(len(dataset))
    if exclude is not None:
        order = order[~np.isin(order, exclude)]
    if count > len(order):
        raise TBAInputError("experiment", f"asked for {count} images, the split has {len(order)}")
    return order[:count]


def _probe_pass(adapter: ViTAdapter, batches: Iterable, variants: list[Variant], maps: dict[Span, LinearMap],
                num_classes: int, heads: dict[str, object] | None, device: str) -> dict[str, object]:
    """One pass over labelled images: probe statistics (heads None) or correct counts (heads given)."""
    results: dict[str, object] = {}
    dtype = next(adapter.model.parameters()).dtype
    with torch.inference_mode():
        for images, labels in batches:
            outputs = list(adapter.iter_block_outputs(images.to(device=device, dtype=dtype), adapter.num_blocks - 1))
            for variant in variants:
                feats = variant_features(adapter, outputs, variant, maps).cpu()
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

    def loader(dataset, idx: np.ndarray) -> DataLoader:
        return DataLoader(Subset(dataset, idx.tolist()), batch_size=config.batch_size)

    spans = sorted({s for v in variants if v.plan is not None for s in v.plan.spans})
    _logger.info("%s seed %d: fitting %d spans on %d calibration images", spec.name, seed, len(spans), len(calibration))
    stats = collect_span_stats(adapter, logged_progress(loader(train, calibration), f"{spec.name} seed {seed}: "
                                                        "calibration", _logger), spans,
                               token_mode=config.token_mode, device=config.device)
    fits = solve_plan(stats, bias=config.bias, ridge=config.ridge)
    for span, fit in fits.items():
        _logger.info("%s seed %d: span %s fitted, calibration relative error %.4g (dropping its blocks: %.4g)",
                     spec.name, seed, span, fit.calibration.relative_error, fit.identity_calibration.relative_error)
    maps = {span: fit.map for span, fit in fits.items()}
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
            report = parameter_report(model, variant.plan, bias=config.bias,
                                      identity=frozenset(variant.plan.spans) if variant.kind == "identity" else frozenset())
            row |= {"params_removed": report.removed, "paper_params_removed": report.paper_removed,
                    "calibration_relative_error": float(np.mean([fits[s].calibration.relative_error if variant.kind == "linear"
                                                                 else fits[s].identity_calibration.relative_error
                                                                 for s in variant.plan.spans]))}
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
                                                          "probe_ridge"})}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def run_experiment(config: ExperimentConfig) -> Path:
    """Run (or resume) the protocol; returns the output directory with rows.jsonl, table.md, table.csv, summary.json
    and accuracy_vs_params.png (accuracy against the exact parameters removed).
    Refused before any work: a device this machine lacks, an output directory holding anything but this
    tool's experiment; before any seed: a line of rows.jsonl that is not a row of this configuration."""
    check_device(config.device)
    files = open_output_dir(config.output, KIND, appended=[ROWS])
    model = create_model(config.model)
    plans = [parse_plan(text, len(model.blocks), field="approximations") for text in config.approximations]
    variants = [Variant(None, "original")] + [Variant(p, "linear") for p in plans]
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
    write_owned(config.output, KIND, files, {"table.md": table_markdown(rows, config), "table.csv": table_csv(rows),
                                             "summary.json": json.dumps(summary, indent=2) + "\n",
                                             ACCURACY_PLOT: accuracy_png(summary)})
    return config.output


class Row(BaseModel):
    """One line of rows.jsonl, as run_seed writes it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    key: str
    dataset: str
    seed: int
    approximation: str
    kind: Literal["original", "linear", "identity"]
    accuracy: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    calibration_images: int = Field(ge=1)
    probe_train_images: int = Field(ge=1)
    probe_test_images: int = Field(ge=1)
    params_removed: int
    paper_params_removed: int
    params: int | None = None
    calibration_relative_error: float | None = Field(None, allow_inf_nan=False)


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
            "Map `linear`: TBA's fitted map; `identity`: the blocks simply dropped.\n")
    return "\n".join(lines) + "\n" + note


def table_csv(rows: list[dict]) -> str:
    summary = summarise(rows)
    keys = list(summary[0]) if summary else []
    return "\n".join([",".join(keys)] + [",".join(json.dumps(s[k]) for k in keys) for s in summary]) + "\n"
