"""Calibration data: sources, the model's preprocessing, and the calibration/held-out split.

Every source can read each image as bytes (``record``): which images a run uses, and which it holds
out, is decided from those bytes alone (`selection`).
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from timm.data import create_transform, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder
from torchvision.datasets.folder import has_file_allowed_extension

from .config import DataConfig
from .errors import TBAInputError
from .images import IMAGE_SUFFIXES, ImageInfo, decode, read_image
from .selection import split_indices

_logger = logging.getLogger(__name__)


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

    def _draw(self, index: int) -> tuple[int, torch.Tensor]:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(self.num_classes, (1,), generator=gen))
        return label, torch.randn(1, 3, 8, 8, generator=gen)

    def record(self, index: int) -> bytes:
        """The image's content before upsampling (it determines the image): its label and coarse noise."""
        label, coarse = self._draw(index)
        return label.to_bytes(4, "little") + coarse.numpy().tobytes()

    @property
    def targets(self) -> np.ndarray:
        return np.array([self._draw(i)[0] for i in range(self.num_images)])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch upsampled in one call (`DataLoader` and `Subset` fetch batches through this)."""
        labels, coarse = zip(*(self._draw(index) for index in indices))
        images = nn.functional.interpolate(torch.cat(coarse), size=self.image_size, mode="bilinear", align_corners=False)
        shift = torch.linspace(-1.0, 1.0, self.num_classes)[list(labels)]
        images = images + shift[:, None, None, None] * torch.tensor([1.0, -0.5, 0.25])[:, None, None]
        return list(zip(images, labels))


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


class _PixelRecords:
    data: np.ndarray  # the uint8 pixels of every image

    def record(self, index: int) -> bytes:
        return np.ascontiguousarray(self.data[index]).tobytes()


class ArrayImages(_PixelRecords, Dataset):
    """uint8 images held as one array ([N, H, W] or [N, H, W, 3]), preprocessed on access.

    Grayscale becomes 3 channels; images are resized to the model's input size with its
    interpolation and normalised with its mean/std, the same as timm's eval transform minus the crop.
    A batch of same-sized images is preprocessed in one tensor call (`__getitems__`): one image at a
    time cost about as much as the forward pass of the blocks a span needs.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, data_cfg: dict) -> None:
        self.data = images
        self.targets = labels.astype(np.int64)
        self.size = tuple(data_cfg["input_size"][1:])
        self.mode = "bicubic" if data_cfg.get("interpolation") == "bicubic" else "bilinear"
        self.mean = torch.tensor(data_cfg["mean"]).view(3, 1, 1)
        self.std = torch.tensor(data_cfg["std"]).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """The images at `indices`, preprocessed together when they have one size (array sources always do)."""
        pixels = [np.asarray(self.data[index]) for index in indices]
        if any(p.shape != pixels[0].shape for p in pixels):  # e.g. public photo crops of different sizes
            return [item for index in indices for item in self.__getitems__([index])]
        images = self._preprocess(torch.from_numpy(np.stack(pixels)))
        return [(image, int(self.targets[index])) for image, index in zip(images, indices)]

    def _preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W] or [N, H, W, 3] -> normalised float [N, 3, *size]. Grayscale is resized as one channel and
        broadcast to three by the normalisation: the same values as resizing three copies, a third of the work."""
        images = pixels.float() / 255.0
        images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
        images = nn.functional.interpolate(images, size=self.size, mode=self.mode, align_corners=False,
                                           antialias=True).clamp(0.0, 1.0)
        return ((images - self.mean) / self.std).contiguous()


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _read_idx(path: Path, magic: int, field: str) -> np.ndarray:
    if not path.is_file():
        raise TBAInputError(field, f"{path} does not exist",
                            "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set data.path")
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
        found, count = struct.unpack(">II", raw[:8])
    except (OSError, EOFError, struct.error) as err:
        raise TBAInputError(field, f"{path} is not a gzipped IDX file ({err})",
                            "reinstall dataset-fashion-mnist or point data.path at intact files") from None
    if found != magic:
        raise TBAInputError(field, f"{path} is not an IDX file of the expected kind (magic {found:#x}, expected {magic:#x})")
    shape = (count, *struct.unpack(">II", raw[8:16])) if magic == 2051 else (count,)  # images: rows, columns follow
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * len(shape))  # after the 32-bit header fields
    if data.size != int(np.prod(shape)):
        raise TBAInputError(field, f"{path} is truncated: {data.size} values for shape {shape}")
    return data.reshape(shape)


def fashion_mnist(config: DataConfig, data_cfg: dict) -> ArrayImages:
    root = Path(config.path) if config.path is not None else FASHION_MNIST_DIR
    prefix = "train" if config.split == "train" else "t10k"
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 2051, "data.path")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 2049, "data.path")
    if len(images) != len(labels):
        raise TBAInputError("data.path", f"{root}: {len(images)} images but {len(labels)} labels")
    return ArrayImages(images, labels, data_cfg)


def medmnist(config: DataConfig, data_cfg: dict) -> ArrayImages:
    path = Path(config.path)  # type: ignore[arg-type]
    if not path.is_file():
        raise TBAInputError("data.path", f"{path} does not exist", "give a MedMNIST-style .npz file")
    keys = (f"{config.split}_images", f"{config.split}_labels")
    try:
        with open(path, "rb") as handle:  # np.load(path) leaks its handle when the zip is corrupt
            loaded = np.load(handle)  # a plain .npy gives one array: no keys
            arrays = {k: loaded[k] for k in keys if k in loaded.files} if isinstance(loaded, np.lib.npyio.NpzFile) else {}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise TBAInputError("data.path", f"{path} is not a readable .npz of plain arrays ({err})",
                            "save it with numpy.savez, without object arrays") from None
    if missing := [k for k in keys if k not in arrays]:
        raise TBAInputError("data.path", f"{path} lacks {missing}",
                            "a MedMNIST .npz holds train/val/test_images and train/val/test_labels")
    images, labels = arrays[keys[0]], arrays[keys[1]].reshape(-1)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
        raise TBAInputError("data.path", f"{path}: expected uint8 images [N, H, W(, 3)] and N labels, "
                                         f"got {images.dtype} {images.shape} and {labels.shape}")
    if labels.dtype.kind not in "iuf" or not np.array_equal(labels, np.round(labels)) or (labels.size and labels.min() < 0):
        raise TBAInputError("data.path", f"{path}: {keys[1]} must be non-negative integers, got {labels.dtype} "
                                         f"{labels[:5].tolist()}...")
    return ArrayImages(images, labels, data_cfg)


class CIFAR10Images(_PixelRecords, CIFAR10):
    """torchvision's CIFAR-10, each image readable as its uint8 pixels."""


class CIFAR100Images(_PixelRecords, CIFAR100):
    """torchvision's CIFAR-100, each image readable as its uint8 pixels."""


UNLABELED = -1  # the label of every image of a flat folder: calibration needs none, the probe refuses it


class ImageFiles(ImageFolder):
    """torchvision's ImageFolder, each image readable as the bytes of its file, each file counted once.

    Labelled: one sub-folder per class. Unlabeled: a flat folder of images, every label `UNLABELED` (calibration
    needs no label; the probe's accuracy does and refuses). Images beside class folders are refused (which label?).
    Files are read with their real bit depth (`tba_fed.images`).

    One image is the unit of privacy, so no file may count twice: no symbolic link is followed (a link
    either leads out of the data root, or back into it to files counted where they are, or round a loop that
    would repeat them), and a file reachable under several names (hard links) counts under its first. What
    was skipped is logged, and named in the refusal if no image is left. An unreadable folder is an error,
    never a silent gap.
    """

    skipped: list[str]
    unlabeled: bool

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as err:
            raise TBAInputError("data.path", f"{directory} cannot be read ({err.strerror or err})",
                                "make the folder readable") from None
        self.skipped = [entry.path for entry in entries if entry.is_symlink()]
        classes = [entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]  # a link is no folder here
        images = [entry.path for entry in entries if entry.is_file(follow_symlinks=False)
                  and has_file_allowed_extension(entry.name, IMAGE_SUFFIXES)]
        if classes and images:
            raise TBAInputError("data.path", f"{directory} holds images both in class folders ({', '.join(classes)}) and "
                                             f"beside them ({images[0]}{' ...' if len(images) > 1 else ''})",
                                "move every image into its class folder, or use a flat folder of images without labels")
        self.unlabeled = not classes and bool(images)
        if not classes and not images:
            raise TBAInputError("data.path", f"Couldn't find any class folder nor image in {directory}"
                                             f"{self._skipped_text()}",
                                "put images in one sub-folder per class, or directly in the folder if unlabeled "
                                "(calibration only)")
        return classes, {name: index for index, name in enumerate(classes)}

    def make_dataset(self, directory: str | Path, class_to_idx: dict[str, int],  # type: ignore[override]
                     extensions: tuple[str, ...] | None = None, is_valid_file: object = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """Every image file under each class folder (or in the flat folder), links skipped, each file
        (device, inode) once."""
        samples: list[tuple[str, int]] = []
        seen: set[tuple[int, int]] = set()

        def unreadable(err: OSError) -> None:
            raise TBAInputError("data.path", f"{err.filename} cannot be read ({err.strerror or err})",
                                "make the folder readable or remove it")

        def add(root: str, files: list[str], label: int) -> None:
            for file in sorted(files):
                path = os.path.join(root, file)
                if os.path.islink(path):
                    self.skipped.append(path)
                elif has_file_allowed_extension(file, IMAGE_SUFFIXES):
                    stat = os.stat(path, follow_symlinks=False)
                    if (stat.st_dev, stat.st_ino) in seen:
                        self.skipped.append(path)
                        continue
                    seen.add((stat.st_dev, stat.st_ino))
                    samples.append((path, label))

        if self.unlabeled:
            add(str(directory), [e.name for e in os.scandir(directory) if not e.is_dir(follow_symlinks=False)], UNLABELED)
        for name, label in sorted(class_to_idx.items()):
            before = len(samples)
            for root, folders, files in os.walk(os.path.join(directory, name), onerror=unreadable):
                folders.sort()
                self.skipped += [os.path.join(root, f) for f in folders if os.path.islink(os.path.join(root, f))]  # not walked
                add(root, files, label)
            if len(samples) == before:
                raise TBAInputError("data.path", f"Found no valid file for the classes {name}. Supported extensions "
                                                 f"are: {', '.join(IMAGE_SUFFIXES)}{self._skipped_text()}",
                                    "put images in one sub-folder per class")
        if self.skipped:
            _logger.warning("image folder %s: %d links and second names of files skipped (never followed, never "
                            "counted twice): %s", directory, len(self.skipped), ", ".join(self.skipped))
        return samples

    def _skipped_text(self) -> str:
        return f" (skipped, never followed: {', '.join(self.skipped)})" if self.skipped else ""

    def record(self, index: int) -> bytes:
        path = self.samples[index][0]
        try:
            return Path(path).read_bytes()
        except OSError as err:
            raise TBAInputError("data.path", f"{path} cannot be read ({err.strerror or err})",
                                "remove the file or make it readable") from None

    def describe(self, index: int) -> tuple[torch.Tensor, ImageInfo]:
        """The preprocessed image as ``self[index]`` gives it, and what its file holds (for preflight)."""
        pixels, info = decode(self.samples[index][0])
        return self.transform(pixels), info


def cifar(config: DataConfig, model: nn.Module) -> Dataset:
    if config.split not in ("train", "test"):
        raise TBAInputError("data.split", "CIFAR has train and test splits")
    cls = CIFAR10Images if config.source == "cifar10" else CIFAR100Images
    transform = create_transform(**data_config(model), is_training=False)
    try:
        return cls(str(config.path), train=config.split == "train", download=config.download, transform=transform)
    except RuntimeError as err:
        raise TBAInputError("data.path", f"{config.path}: {err}",
                            f"put the {config.source} python version there, or set download: true with internet") from None


def build_dataset(config: DataConfig, model: nn.Module) -> Dataset:
    """The configured source, preprocessed with the model's timm data config."""
    if config.source == "synthetic":
        if config.num_images is None:
            raise TBAInputError("data.num_images", "synthetic data needs the number of images to generate", "e.g. 500")
        size = int(data_config(model)["input_size"][-1])
        return SyntheticImages(config.num_images, size, num_classes=config.num_classes, seed=config.seed)
    if config.source == "fashion_mnist":
        return fashion_mnist(config, data_config(model))
    if config.source == "medmnist":
        return medmnist(config, data_config(model))
    if config.source in ("cifar10", "cifar100"):
        return cifar(config, model)
    root = Path(config.path) if config.path is not None else None
    if root is None or not root.is_dir():
        raise TBAInputError("data.path", f"{root} is not a directory",
                            "give a folder with one sub-folder of images per class, or a flat folder of images (unlabeled)")
    transform = create_transform(**data_config(model), is_training=False)
    return ImageFiles(str(root), transform=transform, loader=read_image)


def pool_indices(dataset: Dataset, config: DataConfig) -> np.ndarray:
    """The images that make up the data set: all of them, or a seeded random subset of ``num_images``.

    The subset defines which images exist, for experiments and simulations (a simulation then
    partitions them into sites); a site's own data set is all its images (`SiteDataConfig`).
    Synthetic data has exactly ``num_images`` images.
    """
    total = len(dataset)  # type: ignore[arg-type]
    if total == 0:
        raise TBAInputError("data", "the dataset is empty", "check data.path")
    if config.num_images is None or config.source == "synthetic" or config.num_images >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(config.seed).permutation(total)[: config.num_images])


def calibration_split(dataset: Dataset, config: DataConfig, key: bytes) -> tuple[Subset, Subset]:
    """The calibration and held-out images, each image's fate decided from its own bytes (`selection`).

    The held-out part never enters the fit: it is where a map is compared with the identity skip.
    """
    pool = pool_indices(dataset, config)
    calibration, holdout = split_indices(dataset, pool, key, sample_rate=config.sample_rate,  # type: ignore[arg-type]
                                         holdout_fraction=config.holdout_fraction)
    if len(calibration) == 0:
        raise TBAInputError("data", f"no image was selected for calibration (of {len(pool)}, sample rate "
                                    f"{config.sample_rate:g}, held-out fraction {config.holdout_fraction:g})",
                            "add images, raise data.sample_rate or lower data.holdout_fraction")
    return Subset(dataset, calibration.tolist()), Subset(dataset, holdout.tolist())


def make_loader(dataset: Dataset, config: DataConfig) -> DataLoader:
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers)
