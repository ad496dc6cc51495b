"""The paper's Table-1 protocol: accuracy of many approximations, several seeds, one or more datasets.

Per seed: one statistics pass fits every approximation's maps on ``calibration_images`` training images;
a closed-form ridge probe (on the final-norm class token) is fitted for the original and for every
compressed variant on ``probe_train_images`` and scored on ``probe_test_images`` test images. Every
variant also runs as "identity" (blocks simply dropped) so the value of the linear map is visible.

Variants share the original's block outputs: a variant s->e restarts from the cached output of block s,
so only the blocks after the span are recomputed (equal to the compressed model's forward, see tests).
Finished rows are appended to ``rows.jsonl``; a rerun skips them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .adapter import ViTAdapter
from .calibrate import collect_span_stats
from .compressed import parameter_report
from .config import MAX_BATCH, MAX_IMAGES, DataConfig, Device, ModelConfig, Seed, _Section, read_yaml, validate
from .data import build_dataset
from .errors import TBAInputError
from .fileio import atomic_write_text
from .models import create_model
from .pipeline import solve_plan
from .plan import Plan, Span, parse_plan
from .probe import ProbeStats, solve_probe
from .solver import LinearMap

_logger = logging.getLogger(__name__)

PAPER_APPROXIMATIONS = ("0->1", "3->4", "9->10", "10->11", "2->4", "9->11", "1->2, 4->5", "2->5", "7->10", "1->5")


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


def run_seed(config: ExperimentConfig, model: nn.Module, spec: DatasetSpec, seed: int, variants: list[Variant]) -> list[dict]:
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
    stats = collect_span_stats(adapter, loader(train, calibration), spans, token_mode=config.token_mode,
                               device=config.device)
    fits = solve_plan(stats, bias=config.bias, ridge=config.ridge)
    maps = {span: fit.map for span, fit in fits.items()}
    _logger.info("%s seed %d: probe statistics of %d variants on %d images, then accuracy on %d test images",
                 spec.name, seed, len(variants), len(probe_train), len(probe_test))
    probe_stats = _probe_pass(adapter, tqdm(loader(train, probe_train), desc=f"{spec.name} seed {seed}: probe fit",
                                            leave=False, disable=None), variants, maps, num_classes, None, config.device)
    heads = {label: solve_probe(s, ridge=config.probe_ridge) for label, s in probe_stats.items()}
    correct = _probe_pass(adapter, tqdm(loader(test, probe_test), desc=f"{spec.name} seed {seed}: probe test",
                                        leave=False, disable=None), variants, maps, num_classes, heads, config.device)
    rows = []
    for variant in variants:
        row = {"dataset": spec.name, "seed": seed, "approximation": "original" if variant.plan is None else str(variant.plan),
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
            row |= {"params_removed": 0, "paper_params_removed": 0, "params": sum(p.numel() for p in model.parameters())}
        rows.append(row)
    return rows


def run_experiment(config: ExperimentConfig) -> Path:
    """Run (or resume) the protocol; returns the output directory with rows.jsonl, table.md, table.csv."""
    model = create_model(config.model)
    adapter = ViTAdapter(model)
    plans = [parse_plan(text, adapter.num_blocks, field="approximations") for text in config.approximations]
    variants = [Variant(None, "original")] + [Variant(p, "linear") for p in plans]
    if config.identity_baseline:
        variants += [Variant(p, "identity") for p in plans]
    config.output.mkdir(parents=True, exist_ok=True)
    rows_path = config.output / "rows.jsonl"
    done = {(r["dataset"], r["seed"]) for r in _read_rows(rows_path)}
    for spec in config.datasets:
        for seed in tqdm(config.seeds, desc=f"{spec.name}: seeds", disable=None):
            if (spec.name, seed) in done:
                _logger.info("%s seed %d: already done, skipped", spec.name, seed)
                continue
            rows = run_seed(config, model, spec, seed, variants)
            with open(rows_path, "a") as handle:  # one seed's rows land together or not at all
                handle.write("".join(json.dumps(r) + "\n" for r in rows))
                handle.flush()
                os.fsync(handle.fileno())
            _logger.info("%s seed %d: original %.4f", spec.name, seed, rows[0]["accuracy"])
    rows = _read_rows(rows_path)
    atomic_write_text(config.output / "table.md", table_markdown(rows, config))
    atomic_write_text(config.output / "table.csv", table_csv(rows))
    atomic_write_text(config.output / "summary.json", json.dumps(summarise(rows), indent=2) + "\n")
    return config.output


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            _logger.warning("%s: ignoring a truncated line (an interrupted run); its seed will be redone", path)
    return rows


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
    original = next((s for s in summary if s["approximation"] == "original"), None)
    head = "| Approx. | Map | Params. (paper conv.) | Params. (exact) | " + " | ".join(datasets) + " |"
    lines = [head, "|---" * (4 + len(datasets)) + "|"]
    def rank(key: tuple[str, str]) -> tuple:
        first = next(cell[(d, *key)] for d in datasets if (d, *key) in cell)
        position = config.approximations.index(key[0]) if key[0] in config.approximations else len(config.approximations)
        return -first["paper_params_removed"], position, key[1] != "linear"

    def fmt(s: dict | None, change: bool = True) -> str:
        if s is None:
            return ""
        text = f"{s['accuracy_mean']:.2f} ± {s['accuracy_std']:.2f}"
        return text + (f" ({s['relative_change']:+.2f}%)" if change else "")

    for approx, kind in sorted({(s["approximation"], s["kind"]) for s in summary if s["approximation"] != "original"},
                               key=rank):
        first = next(cell[(d, approx, kind)] for d in datasets if (d, approx, kind) in cell)
        lines.append(f"| {approx} | {kind} | -{first['paper_params_removed'] / 1e6:.2f}M | -{first['params_removed']:,} | "
                     + " | ".join(fmt(cell.get((d, approx, kind))) for d in datasets) + " |")
    if original is not None:
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
