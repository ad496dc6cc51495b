"""Saving and loading compressed models: maps.safetensors + manifest.yaml.

Only the maps are stored: the base weights are rebuilt from their recorded source (hub name,
checkpoint path, or seeded random init), which is what sites in a federation already hold.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .compressed import build_compressed
from .config import ModelConfig
from .errors import TBAInputError
from .fileio import atomic_directory
from .models import create_model
from .plan import parse_plan
from .pipeline import Compression
from .report import compression_dict, compression_markdown, write_json, write_similarity
from .solver import LinearMap
from .stats import SimilarityStats

MAPS_FILE = "maps.safetensors"
MANIFEST_FILE = "manifest.yaml"


def save_compressed(result: Compression, path: str | Path, *, overwrite: bool = False,
                    similarity: SimilarityStats | None = None) -> Path:
    """Write maps, manifest and report (and the similarity that chose the plan) atomically.

    The directory appears complete or not at all.
    """
    if result.source is None:
        raise TBAInputError("source", "saving needs the model's source so load_compressed can rebuild the base weights",
                            "pass source=ModelConfig(...) to calibrate")
    tensors: dict[str, torch.Tensor] = {}
    for span, fit in result.fits.items():
        if fit.map.kind == "linear":
            tensors[f"span.{span.key}.weight"] = fit.map.weight.contiguous()
            if fit.map.bias is not None:
                tensors[f"span.{span.key}.bias"] = fit.map.bias.contiguous()
    report = compression_dict(result)
    manifest = {"format": "tba-fed/compressed", "tba_fed_version": __version__, **report,
                "identity_spans": [str(s) for s, f in result.fits.items() if f.map.kind == "identity"]}
    path = Path(path)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / MAPS_FILE))
        (tmp / MANIFEST_FILE).write_text(yaml.safe_dump(manifest, sort_keys=False))
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(compression_markdown(report))
        if similarity is not None:
            write_similarity(tmp, similarity)
    return path


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
