"""Saving and loading compressed models: maps.safetensors + manifest.yaml.

Only the maps are stored: the base weights are rebuilt from their recorded source (hub name,
checkpoint path, or seeded random init), which is what sites in a federation already hold. Loading
believes nothing it reads: the manifest is validated like a config, and every map is checked against the
rebuilt model (keys, shapes, float64, finite) as a site checks the maps the server sends.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import save
from torch import nn

from . import __version__
from .adapter import MAP_KINDS
from .compressed import build_compressed
from .config import ModelConfig, _format_validation_error, read_yaml
from .errors import TBAInputError
from .fileio import atomic_directory, read_safetensors
from .models import create_model
from .plan import Span, parse_plan
from .pipeline import Compression
from .report import compression_dict, compression_markdown, write_similarity
from .report_html import REPORT_HTML, run_page
from .solver import LinearMap
from .stats import SimilarityStats, check_arrays

MAPS_FILE = "maps.safetensors"
MANIFEST_FILE = "manifest.yaml"


def map_tensors(maps: Mapping[Span, LinearMap]) -> dict[str, torch.Tensor]:
    """The saved (and transmitted) form of the maps: ``span.{s}-{e}.weight`` / ``.bias``, float64 (a folded
    map as fitted, T and c: it is folded when the model is built; the manifest names the kind)."""
    tensors: dict[str, torch.Tensor] = {}
    for span, linear_map in sorted(maps.items()):
        if linear_map.kind != "identity":
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
                    similarity: SimilarityStats | None = None, accuracy: dict | None = None,
                    latency: dict | None = None) -> Path:
    """Write maps, manifest and report (and the similarity that chose the plan, its heatmap marking the plan's
    spans) atomically; `accuracy`: the evaluation set's section (`accuracy.evaluate_models`), if one was scored;
    `latency`: the measured section (`benchmark.eager_latency`), if it was measured."""
    if result.source is None:
        raise TBAInputError("source", "saving needs the model's source so load_compressed can rebuild the base weights",
                            "pass source=ModelConfig(...) to calibrate")
    report = compression_dict(result)
    if accuracy is not None:
        report["accuracy"] = accuracy
    report["latency"] = latency
    maps = {span: fit.map for span, fit in result.fits.items()}
    return write_compressed(
        path, maps, manifest(report, maps), overwrite=overwrite,
        files={"report.json": json.dumps(report, indent=2) + "\n", "report.md": compression_markdown(report),
               REPORT_HTML: run_page(report, similarity)},
        extra=None if similarity is None else (lambda folder: write_similarity(folder, similarity,
                                                                             spans=result.plan.spans)),
    )


def manifest(report: dict, maps: Mapping[Span, LinearMap]) -> dict:
    """What load_compressed needs (model source, plan, map kind, identity spans; under ``map: auto`` each fitted
    span's kind, ``span_maps``) plus the run's diagnostics."""
    kinds = {str(s): m.kind for s, m in sorted(maps.items()) if m.kind != "identity"}
    auto = report.get("map") == "auto"
    return {"format": "tba-fed/compressed", "tba_fed_version": __version__, **report,
            "map": "auto" if auto else "folded" if "folded" in kinds.values() else "linear",
            **({"span_maps": kinds} if auto else {}),
            "identity_spans": [str(s) for s, m in sorted(maps.items()) if m.kind == "identity"]}


def decode_maps(arrays: Mapping[str, np.ndarray], spans: Iterable[Span], identity: Iterable[Span],
                dim: int, kind: str = "maps", map_kind: str | Mapping[Span, str] = "linear") -> dict[Span, LinearMap]:
    """The maps of the plan's fitted spans (all with a bias or none; all of `map_kind`, or each of its kind in
    it), checked like any payload: exactly the expected keys, shapes [dim, dim] and [dim], float64, finite;
    errors name ``KIND.span.S-E.weight``."""
    spans, identity = list(spans), set(identity)
    fitted = [span for span in spans if span not in identity]
    kinds = {span: map_kind if isinstance(map_kind, str) else map_kind.get(span, "") for span in fitted}
    for span, span_kind in kinds.items():
        if span_kind not in MAP_KINDS:
            raise TBAInputError(f"{kind}.span.{span.key}", f"map kind {span_kind or 'missing'!r}",
                                f"use one of {', '.join(MAP_KINDS)}")
    biased = any(key.endswith(".bias") for key in arrays)
    shapes = {f"span.{span.key}.{name}": shape for span in fitted
              for name, shape in (("weight", (dim, dim)), ("bias", (dim,))) if name == "weight" or biased}
    check_arrays(arrays, shapes, kind)

    def fitted_map(span: Span) -> LinearMap:
        bias = arrays.get(f"span.{span.key}.bias")
        return LinearMap(torch.from_numpy(np.array(arrays[f"span.{span.key}.weight"])),
                         None if bias is None else torch.from_numpy(np.array(bias)), kinds[span])  # type: ignore[arg-type]

    return {span: LinearMap.identity(dim) if span in identity else fitted_map(span) for span in spans}


class Manifest(BaseModel):
    """What `load_compressed` reads from manifest.yaml; the rest (parameters, fit diagnostics, the
    federation's report) is the run's record and is not interpreted."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: Literal["tba-fed/compressed"]
    model: ModelConfig
    plan: str
    map: Literal["linear", "folded", "auto"] = "linear"  # manifests written before folded maps existed are linear
    span_maps: dict[str, Literal["linear", "folded"]] = {}  # under map: auto, each fitted span's kind
    identity_spans: list[str] = []


COMPRESSED_FIX = "give a directory that tba-fed compress or a site's install wrote, unmodified"


def read_manifest(path: Path) -> Manifest:
    """The manifest of a compressed-model directory, validated; errors name ``manifest.FIELD`` and the file."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise TBAInputError("path", f"{path} holds no {MANIFEST_FILE}", COMPRESSED_FIX)
    raw = read_yaml(manifest_path, "manifest", COMPRESSED_FIX)
    if raw.get("format") != "tba-fed/compressed":
        raise TBAInputError("manifest", f"{manifest_path} is not a tba-fed manifest", COMPRESSED_FIX)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as err:
        error = _format_validation_error(err, "manifest")
        raise TBAInputError(error.field, f"{manifest_path}: {error.message}", COMPRESSED_FIX) from None


def span_map_kinds(manifest: Manifest, spans: Iterable[Span], identity: Iterable[Span], where: Path
                   ) -> str | dict[Span, str]:
    """The manifest's map kind, or under ``map: auto`` each fitted span's (``span_maps``: exactly those spans)."""
    if manifest.map != "auto":
        return manifest.map
    fitted = sorted(str(s) for s in set(spans) - set(identity))
    if sorted(manifest.span_maps) != fitted:
        raise TBAInputError("manifest.span_maps", f"{where}: names spans {sorted(manifest.span_maps)}, the plan's "
                                                  f"fitted spans are {fitted}", COMPRESSED_FIX)
    return {span: manifest.span_maps[str(span)] for span in spans if str(span) in manifest.span_maps}


def load_compressed(path: str | Path) -> nn.Module:
    """Rebuild a compressed model saved by ``save_compressed`` (base weights from their source)."""
    return open_compressed(path).model


@dataclass(frozen=True)
class OpenedCompressed:
    """A compressed-model directory read back: its manifest, the rebuilt base model and the compressed copy
    (an export describes both)."""

    manifest: Manifest
    base: nn.Module
    model: nn.Module


def open_compressed(path: str | Path) -> OpenedCompressed:
    """`load_compressed`, keeping the manifest and the untouched base model."""
    path = Path(path)
    manifest = read_manifest(path)
    model = create_model(manifest.model)
    plan = parse_plan(manifest.plan, len(model.blocks), field="manifest.plan")
    identity = parse_plan(", ".join(manifest.identity_spans), len(model.blocks), field="manifest.identity_spans").spans \
        if manifest.identity_spans else ()
    if unknown := [str(s) for s in identity if s not in plan.spans]:
        raise TBAInputError("manifest.identity_spans", f"{path / MANIFEST_FILE}: {', '.join(unknown)} not in the plan "
                                                       f"{plan}", COMPRESSED_FIX)
    tensors = read_safetensors(path / MAPS_FILE, MAPS_FILE, COMPRESSED_FIX)
    maps = decode_maps({k: v.numpy() for k, v in tensors.items()}, plan.spans, identity, model.embed_dim, MAPS_FILE,
                       span_map_kinds(manifest, plan.spans, identity, path / MANIFEST_FILE))
    return OpenedCompressed(manifest, model, build_compressed(model, maps))
