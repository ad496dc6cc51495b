"""Exporting a compressed model so that it runs without tba-fed: stock timm weights, ONNX, or a torch.export
program, each with a model card.

A compressed-model directory holds only the maps and a pointer to the base weights, so only tba-fed can load
it. An export is self-contained: every weight is in it, and it is checked against the PyTorch compressed model
right after it is written (the measured difference goes into the card). Outputs are written like every tba-fed
output: atomically, into a new directory or tba-fed's own earlier export (``--overwrite``).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from . import __version__
from .checkpoint import COMPRESSED_FIX, MANIFEST_FILE, MAPS_FILE, OpenedCompressed, open_compressed
from .compressed import BlockApproximation, count_flops, count_parameters
from .config import ModelConfig
from .data import data_config
from .errors import TBAInputError, TBARunError
from .fileio import atomic_directory, check_output_dir, file_sha256
from .plan import parse_plan
from .report import relative_change
from .models import OFFLINE_MODELS, weights_sha256

_logger = logging.getLogger(__name__)

FORMATS = ("timm", "onnx", "pt2")
KIND = "export"  # the output kind in tba-fed-output.json
CARD_MD = "MODEL_CARD.md"
CARD_JSON = "model_card.json"
ONNX_OPSET = 18  # torch.onnx's exporter writes opset 18 and up
ONNX_TOLERANCE = 1e-4
TORCH_TOLERANCE = 1e-5  # timm and pt2 run the same PyTorch kernels as the compressed model
CHECK_BATCH_SIZES = (1, 3)
FORMAT_FIX = "use --format onnx or --format pt2, which hold any map"


def export(compressed_dir: str | Path, out_dir: str | Path, format: str, *, overwrite: bool = False) -> Path:
    """Write `compressed_dir`'s model in `format` to the new directory `out_dir`, with MODEL_CARD.md and
    model_card.json; returns `out_dir`. Input and output are checked before any model is built."""
    if format not in FORMATS:
        raise TBAInputError("format", f"unknown format {str(format)[:40]!r}", f"use one of {', '.join(FORMATS)}")
    source, out = Path(compressed_dir), Path(out_dir)
    check_output_dir(out, kind=KIND, overwrite=overwrite)
    check_compressed_dir(source)
    writer = _WRITERS[format]
    if format == "onnx":
        require_onnx()
    opened = open_compressed(source)
    model = opened.model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    stock = stock_timm_model(opened) if format == "timm" else None  # refused here, before anything is written
    with atomic_directory(out, kind=KIND, overwrite=overwrite) as tmp:
        check = writer(model, stock, tmp)
        weights = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.name != "config.json"}
        card = model_card(opened, source, format, check, weights)
        if format == "timm":
            config = json.loads((tmp / "config.json").read_text())
            (tmp / "config.json").write_text(json.dumps({**config, "tba_fed": card}, indent=2) + "\n")
        (tmp / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
        (tmp / CARD_MD).write_text(card_markdown(card))
    _logger.info("%s export of %s written to %s (max abs diff %.3g)", format, source, out, check.max_abs_diff)
    return out


def check_compressed_dir(path: Path) -> None:
    """`path` is a compressed-model directory (refused in one line naming ``input`` before any model is built)."""
    if not path.is_dir():
        raise TBAInputError("input", f"{path} {'is not a directory' if path.exists() else 'does not exist'}",
                            COMPRESSED_FIX)
    if not (path / MANIFEST_FILE).is_file() or not (path / MAPS_FILE).is_file():
        raise TBAInputError("input", f"{path} is not a compressed model (it needs {MANIFEST_FILE} and {MAPS_FILE})",
                            COMPRESSED_FIX)


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise TBAInputError("format", f"onnx export needs onnx, onnxscript and onnxruntime ({err})",
                            "pip install 'tba-fed[export]'") from None


# ---- inputs and checks ---------------------------------------------------------------------------------------


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model was built for."""
    channels, height, width = data_config(model)["input_size"]
    return int(channels), int(height), int(width)


def check_images(model: nn.Module, batch: int, seed: int = 0) -> torch.Tensor:
    """Seeded normalised-scale images for the checks done right after export (no data set is needed)."""
    generator = torch.Generator().manual_seed(seed + batch)
    return torch.randn(batch, *input_shape(model), generator=generator)


@dataclass(frozen=True)
class Check:
    """How the export was compared with the PyTorch compressed model."""

    runtime: str
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    tolerance: float

    def as_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "batch_sizes": list(self.batch_sizes), "max_abs_diff": self.max_abs_diff,
                "tolerance": self.tolerance}


def _compare(model: nn.Module, run: Callable[[torch.Tensor], np.ndarray], runtime: str, tolerance: float) -> Check:
    """Run both on seeded images of every batch size; an export that differs by more than `tolerance` fails."""
    worst = 0.0
    with torch.no_grad():
        for batch in CHECK_BATCH_SIZES:
            images = check_images(model, batch)
            expected = model(images).numpy()
            found = np.asarray(run(images))
            if found.shape != expected.shape:
                raise TBARunError(f"{runtime}: output shape {found.shape} for batch {batch}, expected {expected.shape}")
            worst = max(worst, float(np.abs(found.astype(np.float64) - expected).max()))
    if not worst <= tolerance:
        raise TBARunError(f"{runtime}: the export differs from the PyTorch compressed model by {worst:.3g} "
                          f"(tolerance {tolerance:g}); nothing was written")
    return Check(runtime, CHECK_BATCH_SIZES, worst, tolerance)


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=65536)},)


# ---- timm ----------------------------------------------------------------------------------------------------


def stock_architecture(config: ModelConfig) -> tuple[str, dict[str, Any]]:
    """The timm architecture and create_model kwargs that rebuild the base model (the offline DINOv2-S is timm's
    ``vit_small_patch14_dinov2`` without a head)."""
    if config.name in OFFLINE_MODELS:
        from .dinov2_imgfocus import ARCH

        return ARCH, {"img_size": config.kwargs.get("img_size", 224), "num_classes": 0}
    return config.name, dict(config.kwargs)


def stock_blocks(model: nn.Module) -> list[nn.Module]:
    """The compressed model's blocks (dropped and folded spans leave none of their own); refused unless every one
    is a stock timm block, since only those load into ``timm.create_model(name, depth=...)``."""
    kept: list[nn.Module] = []
    for block in model.blocks:
        if isinstance(block, BlockApproximation):
            raise TBAInputError("format", f"timm: span {block.span} holds a linear map, and a stock timm model has no "
                                          "place for one (only spans whose blocks are dropped, identity_spans, "
                                          "export to timm)", FORMAT_FIX)
        if not type(block).__module__.startswith("timm."):
            raise TBAInputError("format", f"timm: block {len(kept)} is a {type(block).__name__}, not a stock timm "
                                          "block", FORMAT_FIX)
        kept.append(block)
    return kept


@dataclass(frozen=True)
class StockModel:
    name: str
    kwargs: dict[str, Any]
    model: nn.Module


def stock_timm_model(opened: OpenedCompressed) -> StockModel:
    """A stock ``timm.create_model(name, depth=kept, **kwargs)`` holding the compressed model's weights, loaded
    with strict=True: proof that stock timm reads them."""
    blocks = stock_blocks(opened.model)
    name, kwargs = stock_architecture(opened.manifest.model)
    kwargs = {**kwargs, "depth": len(blocks)}
    stripped = copy.deepcopy(opened.model)
    stripped.blocks = nn.Sequential(*blocks)
    stock = timm.create_model(name, pretrained=False, **kwargs)
    try:
        stock.load_state_dict(stripped.state_dict(), strict=True)
    except RuntimeError as err:
        raise TBAInputError("format", f"timm: the compressed weights do not load into a stock {name} with "
                                      f"depth={len(blocks)} ({str(err)[:300]})", FORMAT_FIX) from None
    return StockModel(name, kwargs, stock.eval())


def _write_timm(model: nn.Module, stock: StockModel | None, folder: Path) -> Check:
    """model.safetensors (a stock state dict) and config.json in timm's own layout: ``create_model(name, **model_args)``
    then ``load_state_dict``, or ``timm.create_model("local-dir:DIR", pretrained=True)``."""
    from safetensors.torch import save_file

    assert stock is not None
    state = {key: value.detach().contiguous().clone() for key, value in stock.model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt", "architecture": stock.name})
    cfg = data_config(stock.model)
    pretrained_cfg = {key: (list(value) if isinstance(value, tuple) else value) for key, value in cfg.items()}
    pretrained_cfg |= {"num_classes": stock.model.num_classes, "fixed_input_size": True}
    (folder / "config.json").write_text(json.dumps({
        "architecture": stock.name, "num_classes": stock.model.num_classes, "num_features": stock.model.num_features,
        "model_args": stock.kwargs, "pretrained_cfg": pretrained_cfg}, indent=2) + "\n")
    return _compare(model, lambda images: stock.model(images).numpy(), f"timm {timm.__version__}", TORCH_TOLERANCE)


# ---- onnx and pt2 --------------------------------------------------------------------------------------------


def write_onnx(model: nn.Module, folder: Path) -> Check:
    """folder/model.onnx (opset 18, dynamic batch axis ``batch``), then run by onnxruntime on batches of 1 and 3 and
    compared with `model` (the benchmark exports the original model with it too)."""
    import onnxruntime

    path = folder / "model.onnx"
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_800_000_000  # protobuf's 2 GB limit
    with torch.no_grad():
        torch.onnx.export(model, (check_images(model, 2),), str(path), dynamo=True, opset_version=ONNX_OPSET,
                          input_names=["images"], output_names=["logits"], dynamic_shapes=_dynamic_batch(),
                          external_data=large, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return _compare(model, lambda images: session.run(None, {"images": images.numpy()})[0],
                    f"onnxruntime {onnxruntime.__version__}", ONNX_TOLERANCE)


def _write_pt2(model: nn.Module, stock: StockModel | None, folder: Path) -> Check:
    """model.pt2 (torch.export, dynamic batch axis), reloaded with torch.export.load before it is accepted."""
    path = folder / "model.pt2"
    with torch.no_grad():
        program = torch.export.export(model, (check_images(model, 2),), dynamic_shapes=_dynamic_batch())
    torch.export.save(program, str(path))
    reloaded = torch.export.load(str(path)).module()
    return _compare(model, lambda images: reloaded(images).numpy(), f"torch.export {torch.__version__}",
                    TORCH_TOLERANCE)


_WRITERS: dict[str, Callable[[nn.Module, StockModel | None, Path], Check]] = {  # stock: the timm format's model
    "timm": _write_timm, "onnx": lambda model, stock, folder: write_onnx(model, folder), "pt2": _write_pt2}


# ---- model card ----------------------------------------------------------------------------------------------


def _base_source(config: ModelConfig) -> str:
    if config.checkpoint is not None:
        return f"checkpoint {config.checkpoint}"
    if config.pretrained:
        return "timm hub weights"
    return "offline, converted at set-up" if config.name in OFFLINE_MODELS else f"random init, seed {config.seed}"


def _checkpoint_sha256(config: ModelConfig) -> str | None:
    """The checkpoint pin the manifest records, else the checkpoint file's own sha256 (it was just loaded)."""
    if config.sha256 is not None:
        return config.sha256
    return file_sha256(config.checkpoint) if config.checkpoint is not None else None


def _accuracy(record: dict[str, Any]) -> dict[str, Any] | None:
    """The run's held-out accuracy, if its report measured one (compress with an evaluation set, or a federated run
    with evaluation enabled)."""
    if isinstance(measured := record.get("accuracy"), dict):
        return {"original": measured.get("original"), "compressed": measured.get("compressed"),
                "test_images": measured.get("evaluation_images"), "probe": measured.get("method")}
    evaluation = record.get("evaluation")
    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("pooled"), dict):
        return None
    pooled = evaluation["pooled"]
    return {"original": pooled.get("original"), "compressed": pooled.get("compressed"),
            "test_images": evaluation.get("test_images"), "probe": evaluation.get("probe")}


def _privacy(record: dict[str, Any]) -> dict[str, Any] | None:
    privacy = record.get("privacy")
    if not isinstance(privacy, dict):
        return None
    return {key: privacy.get(key) for key in ("epsilon", "delta", "accountant", "aggregation", "noise_multiplier")}


def model_card(opened: OpenedCompressed, source: Path, format: str, check: Check, files: dict[str, str]) -> dict[str, Any]:
    """The facts a user of the export needs: what it was made from, what was removed, what it costs, how well it
    did, whether it is private, and how closely the export matches the compressed model. `files`: the weight
    files and their sha256 (timm's config.json holds the card, so it cannot list its own digest)."""
    manifest, base, model = opened.manifest, opened.base, opened.model
    record = manifest.model_extra or {}  # the run's report, as the manifest records it
    plan = parse_plan(manifest.plan, len(base.blocks), field="manifest.plan")
    dropped = {str(s) for s in parse_plan(", ".join(manifest.identity_spans), len(base.blocks)).spans} \
        if manifest.identity_spans else set()
    spans = [{"span": str(span), "kind": "identity" if str(span) in dropped else manifest.span_maps.get(str(span), manifest.map),
              "blocks_removed": len(span.removed)} for span in plan.spans]
    original_flops, compressed_flops = count_flops(base), count_flops(model)
    return {
        "format": format,
        "tba_fed_version": __version__,
        "source": {"directory": str(source), "maps_sha256": file_sha256(source / MAPS_FILE),
                   "federated": "federation" in record},
        "base_model": {"name": manifest.model.name, "weights": _base_source(manifest.model),
                       "kwargs": manifest.model.kwargs, "weights_sha256": weights_sha256(base),
                       "checkpoint_sha256": _checkpoint_sha256(manifest.model)},
        "input": {"shape": [1, *input_shape(model)], "mean": list(data_config(model)["mean"]),
                  "std": list(data_config(model)["std"])},
        "plan": manifest.plan,
        "spans": spans,
        "parameters": {"original": count_parameters(base), "compressed": count_parameters(model)},
        "flops": {"original": original_flops, "compressed": compressed_flops,
                  "counted": "torch.utils.flop_counter.FlopCounterMode, one image"},
        "accuracy": _accuracy(record),
        "privacy": _privacy(record),
        "check": check.as_dict(),
        "files": dict(files),
    }


LOADING = {
    "timm": "import json, timm; from safetensors.torch import load_file\n"
            "cfg = json.load(open('config.json'))\n"
            "model = timm.create_model(cfg['architecture'], **cfg['model_args'])  # or timm.create_model"
            "('local-dir:.', pretrained=True)\n"
            "model.load_state_dict(load_file('model.safetensors'), strict=True)",
    "onnx": "import onnxruntime\n"
            "session = onnxruntime.InferenceSession('model.onnx')\n"
            "logits = session.run(None, {'images': images})[0]  # images: float32 [batch, C, H, W], normalised as above",
    "pt2": "import torch\n"
           "model = torch.export.load('model.pt2').module()\n"
           "logits = model(images)",
}


def card_markdown(card: dict[str, Any]) -> str:
    """MODEL_CARD.md: the card's facts as a short page."""
    base, params, flops, check = card["base_model"], card["parameters"], card["flops"], card["check"]
    spans = ", ".join(f"{s['span']} {s['kind']} ({s['blocks_removed']} block{'s' if s['blocks_removed'] > 1 else ''})"
                      for s in card["spans"])
    accuracy = card["accuracy"]
    accuracy_text = "not measured (the compressed model's report holds no accuracy)" if accuracy is None else (
        f"{accuracy['original']:.4f} original, {accuracy['compressed']:.4f} compressed on {accuracy['test_images']} "
        f"held-out images ({accuracy['probe']})")
    privacy = card["privacy"]
    privacy_text = "not private" if privacy is None else (
        f"(ε, δ) = ({privacy['epsilon']:g}, {privacy['delta']:g}) per site, {str(privacy['accountant']).upper()} "
        f"accounting, {privacy['aggregation']}")
    shape = "×".join(str(n) for n in card["input"]["shape"][1:])
    lines = [
        f"# {base['name']}, compressed with tba-fed ({card['format']} export)", "",
        f"- base model: `{base['name']}` ({base['weights']}); weights sha256 `{base['weights_sha256']}` (every tensor's "
        f"name, dtype, shape and bytes)" + (f"; checkpoint sha256 `{base['checkpoint_sha256']}`"
                                            if base["checkpoint_sha256"] else ""),
        f"- plan: `{card['plan']}`; {spans}",
        f"- parameters: {relative_change(params['original'], params['compressed'])}",
        f"- FLOPs per {shape} image: {relative_change(flops['original'], flops['compressed'])} ({flops['counted']})",
        f"- accuracy: {accuracy_text}",
        f"- privacy: {privacy_text}",
        f"- check: {check['runtime']} against the PyTorch compressed model on batches of "
        f"{' and '.join(str(b) for b in check['batch_sizes'])}: max abs diff {check['max_abs_diff']:.3g} "
        f"(tolerance {check['tolerance']:g})",
        f"- made from `{card['source']['directory']}` (maps sha256 `{card['source']['maps_sha256']}`"
        f"{', a federated run' if card['source']['federated'] else ''}) by tba-fed {card['tba_fed_version']}",
        f"- input: {shape} images normalised with mean {card['input']['mean']} and std {card['input']['std']}",
        "", "Files:", "", *(f"- `{name}` sha256 `{digest}`" for name, digest in card["files"].items()),
        "", "Loading (no tba-fed needed):", "", "```python", LOADING[card["format"]], "```",
    ]
    return "\n".join(lines) + "\n"
