"""Saving and loading compressed models: maps.safetensors + manifest.yaml.

Only the maps are stored: the base weights are rebuilt from their recorded source (hub name,
checkpoint path, or seeded random init), which is what sites in a federation already hold.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save
from torch import nn

from . import __version__
from .compressed import build_compressed
from .config import ModelConfig
from .errors import TBAInputError
from .fileio import atomic_directory
from .models import create_model
from .plan import Span, parse_plan
from .pipeline import Compression
from .report import compression_dict, compression_markdown, write_similarity
from .solver import LinearMap
from .stats import SimilarityStats

MAPS_FILE = "maps.safetensors"
MANIFEST_FILE = "manifest.yaml"


def map_tensors(maps: Mapping[Span, LinearMap]) -> dict[str, torch.Tensor]:
    """The saved (and transmitted) form of the maps: ``span.{s}-{e}.weight`` / ``.bias``, float64."""
    tensors: dict[str, torch.Tensor] = {}
    for span, linear_map in sorted(maps.items()):
        if linear_map.kind == "linear":
            tensors[f"span.{span.key}.weight"] = linear_map.weight.to(torch.float64).contiguous()
            if linear_map.bias is not None:
                tensors[f"span.{span.key}.bias"] = linear_map.bias.to(torch.float64).contiguous()
    return tensors


def maps_checksum(maps: Mapping[Span, LinearMap]) -> str:
    """sha256 of the exact bytes of maps.safetensors, so a site can prove what it installed."""
    return hashlib.sha256(save(map_tensors(maps))).hexdigest()


def write_compressed(path: str | Path, maps: Mapping[Span, LinearMap], manifest: dict, *, overwrite: bool = False,
                     files: Mapping[str, str] | None = None,
                     extra: Callable[[Path], None] | None = None) -> Path:
    """Write maps.safetensors + manifest.yaml (+ text files) atomically: complete or absent."""
    path = Path(path)
    with atomic_directory(path, kind="compressed", overwrite=overwrite) as tmp:
        (tmp / MAPS_FILE).write_bytes(save(map_tensors(maps)))
        (tmp / MANIFEST_FILE).write_text(yaml.safe_dump(manifest, sort_keys=False))
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        if extra is not None:
            extra(tmp)
    return path


def save_compressed(result: Compression, path: str | Path, *, overwrite: bool = False,
                    similarity: SimilarityStats | None = None) -> Path:
    """Write maps, manifest and report (and the similarity that chose the plan) atomically."""
    if result.source is None:
        raise TBAInputError("source", "saving needs the model's source so load_compressed can rebuild the base weights",
                            "pass source=ModelConfig(...) to calibrate")
    report = compression_dict(result)
    maps = {span: fit.map for span, fit in result.fits.items()}
    return write_compressed(
        path, maps, manifest(report, maps), overwrite=overwrite,
        files={"report.json": json.dumps(report, indent=2) + "\n", "report.md": compression_markdown(report)},
        extra=None if similarity is None else (lambda folder: write_similarity(folder, similarity)),
    )


def manifest(report: dict, maps: Mapping[Span, LinearMap]) -> dict:
    """What load_compressed needs (model source, plan, identity spans) plus the run's diagnostics."""
    return {"format": "tba-fed/compressed", "tba_fed_version": __version__, **report,
            "identity_spans": [str(s) for s, m in sorted(maps.items()) if m.kind == "identity"]}


def load_compressed(path: str | Path) -> nn.Module:
    """Rebuild a compressed model saved by ``save_compressed`` (base weights from their source)."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise TBAInputError("path", f"{path} holds no {MANIFEST_FILE}", "give a directory written by tba-fed compress")
    manifest = yaml.safe_load(manifest_path.read_text())
    if not isinstance(manifest, dict) or manifest.get("format") != "tba-fed/compressed":
        raise TBAInputError("manifest", f"{manifest_path} is not a tba-fed manifest")
    model = create_model(ModelConfig.model_validate(manifest["model"]))
    plan = parse_plan(manifest["plan"], len(model.blocks), field="manifest.plan")
    identity = {s.strip() for s in manifest.get("identity_spans", [])}
    tensors = load_file(str(path / MAPS_FILE))
    maps = {}
    for span in plan.spans:
        if str(span) in identity:
            maps[span] = LinearMap.identity(model.embed_dim)
            continue
        weight = tensors.get(f"span.{span.key}.weight")
        if weight is None:
            raise TBAInputError(MAPS_FILE, f"missing tensor span.{span.key}.weight")
        maps[span] = LinearMap(weight, tensors.get(f"span.{span.key}.bias"))
    return build_compressed(model, maps)
