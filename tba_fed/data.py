"""Calibration data: sources, the model's preprocessing, and the calibration/held-out split."""

from __future__ import annotations

from pathlib import Path

import torch
from timm.data import create_transform, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .config import DataConfig
from .errors import TBAInputError


class SyntheticImages(Dataset):
    """Deterministic smooth random images at the model's input size, for tests and smoke runs.

    Image i depends only on (seed, i): low-resolution noise upsampled bilinearly, plus a
    class-dependent colour shift so the labels carry signal.
    """

    def __init__(self, num_images: int, image_size: int, *, num_classes: int = 10, seed: int = 0) -> None:
        self.num_images = num_images
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(self.num_classes, (1,), generator=gen))
        coarse = torch.randn(1, 3, 8, 8, generator=gen)
        image = nn.functional.interpolate(coarse, size=self.image_size, mode="bilinear", align_corners=False)[0]
        shift = torch.linspace(-1.0, 1.0, self.num_classes)[label]
        return image + shift * torch.tensor([1.0, -0.5, 0.25])[:, None, None], label


def data_config(model: nn.Module) -> dict:
    """timm's preprocessing config, with the input size the model was actually built for.

    timm's ``resolve_data_config`` reports the pretrained config's size, which is wrong when the
    model was created with an ``img_size`` override (e.g. DINOv2 at 112 px).
    """
    config = resolve_data_config(model=model)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        config["input_size"] = (3, int(size[0]), int(size[1]))
    return config


def _input_size(model: nn.Module) -> int:
    return int(data_config(model)["input_size"][-1])


def build_dataset(config: DataConfig, model: nn.Module) -> Dataset:
    """The configured source, preprocessed with the model's timm data config."""
    if config.source == "synthetic":
        return SyntheticImages(config.num_images, _input_size(model), num_classes=config.num_classes, seed=config.seed)
    from torchvision.datasets import ImageFolder

    root = Path(config.path) if config.path is not None else None
    if root is None or not root.is_dir():
        raise TBAInputError("data.path", f"{root} is not a directory", "give a folder with one sub-folder of images per class")
    transform = create_transform(**data_config(model), is_training=False)
    try:
        dataset = ImageFolder(str(root), transform=lambda img: transform(img.convert("RGB")))
    except FileNotFoundError as err:
        raise TBAInputError("data.path", f"{root}: {err}", "put images in one sub-folder per class") from None
    return dataset


def calibration_split(dataset: Dataset, config: DataConfig) -> tuple[Subset, Subset]:
    """A seeded random sample of ``num_images`` split into calibration and held-out parts.

    The held-out part never enters the fit: it is where a map is compared with the identity skip.
    """
    total = len(dataset)  # type: ignore[arg-type]
    if total == 0:
        raise TBAInputError("data", "the dataset is empty", "check data.path")
    count = min(config.num_images, total)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(config.seed))[:count].tolist()
    held = int(round(count * config.holdout_fraction))
    if count - held < 1:
        raise TBAInputError("data.holdout_fraction", f"leaves no calibration images out of {count}")
    return Subset(dataset, order[held:]), Subset(dataset, order[:held])


def make_loader(dataset: Dataset, config: DataConfig) -> DataLoader:
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers)
