"""Public natural photos for a server-side prior: no site data, so no privacy cost.

The server fits each span's map on random crops of the 26 images that ship inside the
scikit-image and scikit-learn wheels (mostly photographs) and uses it as the prior P. Only files that are in the
installed packages are read (never ``skimage.data``'s pooch downloads), so nothing touches the
network and the photos are the same on every machine with the same package versions.

The crops get the sites' preprocessing (``ArrayImages``: the model's interpolation with
antialiasing, its mean/std), so the prior sees the same input pipeline as the sites' data.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader

from .config import DataConfig
from .data import ArrayImages, data_config, make_loader
from .errors import TBAInputError

_logger = logging.getLogger(__name__)

MIN_PHOTOS = 10
MIN_CROP_FRACTION = 0.3  # of the shorter side: small enough for object-scale views, large enough to keep context
MAX_CROP_FRACTION = 1.0


@dataclass(frozen=True)
class PublicPhoto:
    """One photo bundled in an installed wheel: ``package``'s directory joined with ``file``."""

    name: str
    package: str
    file: str
    note: str = ""


# Every still image bundled in the two wheels (grayscale ones are replicated to 3 channels on load):
# the natural photographs, and the graphics, silhouettes and text pages, which make the prior map
# measurably better on object-on-plain-background data (DINOv2-S span 2->4, held-out error relative
# to dropping the blocks on Fashion-MNIST: 0.317 with the photographs alone, 0.274 with all of these).
# Left out: microaneurysms (102 px), lfw_subset (25 px faces), chessboard_RGB (a copy of
# chessboard_GRAY), the multipage tif/gif test files, and every skimage.data image that needs a
# pooch download (eagle, brain, lily, kidney, skin, ...).
PHOTOS: tuple[PublicPhoto, ...] = (
    PublicPhoto("astronaut", "skimage", "data/astronaut.png"),
    PublicPhoto("brick", "skimage", "data/brick.png", "grayscale texture"),
    PublicPhoto("camera", "skimage", "data/camera.png", "grayscale"),
    PublicPhoto("chelsea", "skimage", "data/chelsea.png", "cat"),
    PublicPhoto("clock_motion", "skimage", "data/clock_motion.png", "grayscale, motion-blurred"),
    PublicPhoto("coffee", "skimage", "data/coffee.png"),
    PublicPhoto("coins", "skimage", "data/coins.png", "grayscale"),
    PublicPhoto("grass", "skimage", "data/grass.png", "grayscale texture"),
    PublicPhoto("gravel", "skimage", "data/gravel.png", "grayscale texture"),
    PublicPhoto("hubble_deep_field", "skimage", "data/hubble_deep_field.jpg", "astronomical"),
    PublicPhoto("immunohistochemistry", "skimage", "data/ihc.png", "microscopy, kept: colourful and textured"),
    PublicPhoto("moon", "skimage", "data/moon.png", "grayscale"),
    PublicPhoto("motorcycle_left", "skimage", "data/motorcycle_left.png"),
    PublicPhoto("retina", "skimage", "data/retina.jpg", "fundus photograph"),
    PublicPhoto("rocket", "skimage", "data/rocket.jpg"),
    PublicPhoto("motorcycle_right", "skimage", "data/motorcycle_right.png", "the other stereo view"),
    PublicPhoto("cell", "skimage", "data/cell.png", "grayscale microscopy"),
    PublicPhoto("chessboard", "skimage", "data/chessboard_GRAY.png", "graphic"),
    PublicPhoto("color", "skimage", "data/color.png", "graphic: colour wheel"),
    PublicPhoto("horse", "skimage", "data/horse.png", "silhouette"),
    PublicPhoto("logo", "skimage", "data/logo.png", "graphic"),
    PublicPhoto("page", "skimage", "data/page.png", "scanned text page"),
    PublicPhoto("text", "skimage", "data/text.png", "text"),
    PublicPhoto("phantom", "skimage", "data/phantom.png", "Shepp-Logan phantom"),
    PublicPhoto("china", "sklearn", "datasets/images/china.jpg"),
    PublicPhoto("flower", "sklearn", "datasets/images/flower.jpg"),
)


def _package_dir(package: str) -> Path | None:
    """The installed package's directory, found without importing it (importing sklearn takes a second)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()  # L -> 3 equal channels, RGBA -> RGB


@functools.lru_cache(maxsize=4)
def load_photos(sources: tuple[PublicPhoto, ...] = PHOTOS) -> tuple[tuple[str, np.ndarray], ...]:
    """(name, uint8 [H, W, 3]) of every source that is installed; read once per process.

    A missing or unreadable file is logged and skipped; fewer than ``MIN_PHOTOS`` is an error
    because a prior fitted on a handful of scenes would mostly reflect those scenes.
    """
    photos = []
    for source in sources:
        root = _package_dir(source.package)
        path = root / source.file if root is not None else None
        if path is None or not path.is_file():
            _logger.warning("public photo %s: %s/%s is not installed, skipped", source.name, source.package, source.file)
            continue
        try:
            photos.append((source.name, _read_rgb(path)))
        except OSError as err:
            _logger.warning("public photo %s: cannot read %s (%s), skipped", source.name, path, err)
    if len(photos) < MIN_PHOTOS:
        raise TBAInputError("public_images", f"only {len(photos)} of {len(sources)} bundled photos are available, "
                                             f"at least {MIN_PHOTOS} are needed",
                            "pip install scikit-image scikit-learn: the photos ship inside their wheels")
    return tuple(photos)


class _Crops(Sequence):
    """Crop i as uint8 [h, w, 3], a function of (seed, i) only: prefixes agree across ``num_images``."""

    def __init__(self, photos: tuple[tuple[str, np.ndarray], ...], num_images: int, seed: int) -> None:
        self.photos = photos
        self.num_images = num_images
        self.seed = seed
        # round-robin over a seeded order of the photos: every photo gets its share of crops
        self.order = torch.randperm(len(photos), generator=torch.Generator().manual_seed(seed)).tolist()

    def __len__(self) -> int:
        return self.num_images

    def photo_index(self, index: int) -> int:
        return self.order[index % len(self.photos)]

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        photo = self.photos[self.photo_index(index)][1]
        height, width = photo.shape[:2]
        u = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
        side = max(1, round(min(height, width) * (MIN_CROP_FRACTION + (MAX_CROP_FRACTION - MIN_CROP_FRACTION) * u[0])))
        top = int(u[1] * (height - side + 1))
        left = int(u[2] * (width - side + 1))
        crop = photo[top: top + side, left: left + side]
        return crop[:, ::-1] if u[3] < 0.5 else crop


class PublicPhotos(ArrayImages):
    """``num_images`` seeded random square crops of the bundled photos, as ``(image, 0)`` pairs.

    Each crop's side is 30-100% of its photo's shorter side, at a random position, flipped
    horizontally with probability 1/2, then resized to ``img_size`` and normalised exactly like the
    sites' array sources. Use ``from_model`` to take size, interpolation, mean and std from a model.
    """

    def __init__(self, num_images: int = 336, *, img_size: int = 224, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, interpolation: str = "bicubic", seed: int = 0) -> None:
        if num_images < 1:
            raise TBAInputError("public_images.num_images", f"must be >= 1, got {num_images}")
        if img_size < 1:
            raise TBAInputError("public_images.img_size", f"must be >= 1, got {img_size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise TBAInputError("public_images", f"mean and std need 3 values, std > 0 (got {tuple(mean)}, {tuple(std)})")
        self.crops = _Crops(load_photos(), num_images, seed)
        data_cfg = {"input_size": (3, img_size, img_size), "interpolation": interpolation,
                    "mean": tuple(mean), "std": tuple(std)}
        super().__init__(self.crops, np.zeros(num_images, dtype=np.int64), data_cfg)  # type: ignore[arg-type]

    @classmethod
    def from_model(cls, model: nn.Module, num_images: int = 336, *, img_size: int | None = None,
                   seed: int = 0) -> PublicPhotos:
        """Preprocessing from the model's timm data config, as ``build_dataset`` gives the sites."""
        cfg = data_config(model)
        size = int(cfg["input_size"][-1]) if img_size is None else img_size
        return cls(num_images, img_size=size, mean=cfg["mean"], std=cfg["std"],
                   interpolation=cfg.get("interpolation", "bicubic"), seed=seed)

    def photo_name(self, index: int) -> str:
        """Which photo crop ``index`` comes from (for inspecting a prior's data)."""
        return self.crops.photos[self.crops.photo_index(index)][0]


def public_loader(model: nn.Module, num_images: int = 336, img_size: int | None = None, batch_size: int = 32,
                  seed: int = 0) -> DataLoader:
    """Batches of public crops in a fixed order, built like the sites' loaders (``make_loader``)."""
    if batch_size < 1:
        raise TBAInputError("public_images.batch_size", f"must be >= 1, got {batch_size}")
    dataset = PublicPhotos.from_model(model, num_images, img_size=img_size, seed=seed)
    return make_loader(dataset, DataConfig(batch_size=batch_size))
