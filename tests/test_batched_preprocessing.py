"""Batched preprocessing (`__getitems__`) gives exactly the per-image results it replaced.

The reference functions below are the per-image code the array and synthetic sources had before batching
(grayscale expanded to three channels, then resized one image at a time). The tolerance is zero: resizing is
computed per channel plane, so batching the planes or resizing one grayscale plane instead of three identical
copies changes no arithmetic, and the fit sees the very same inputs.
"""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from tba_fed.config import DataConfig
from tba_fed.data import ArrayImages, SyntheticImages, fashion_mnist, pool_indices
from tba_fed.public_images import PublicPhotos

DINOV2_112 = {"input_size": (3, 112, 112), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
              "std": (0.229, 0.224, 0.225)}  # dinov2-s-imgfocus at img_size=112, as data_config gives it


def per_image_array(dataset: ArrayImages, index: int) -> torch.Tensor:
    image = torch.from_numpy(np.array(dataset.data[index])).float() / 255.0
    image = image.expand(3, *image.shape) if image.ndim == 2 else image.permute(2, 0, 1)
    image = nn.functional.interpolate(image[None], size=dataset.size, mode=dataset.mode, align_corners=False,
                                      antialias=True)[0].clamp(0.0, 1.0)
    return (image - dataset.mean) / dataset.std


def per_image_synthetic(dataset: SyntheticImages, index: int) -> tuple[torch.Tensor, int]:
    label, coarse = dataset._draw(index)
    image = nn.functional.interpolate(coarse, size=dataset.image_size, mode="bilinear", align_corners=False)[0]
    shift = torch.linspace(-1.0, 1.0, dataset.num_classes)[label]
    return image + shift * torch.tensor([1.0, -0.5, 0.25])[:, None, None], label


def test_fashion_mnist_batches_equal_per_image_preprocessing():
    """Real Fashion-MNIST images through the loader compress builds (a Subset, batches of 32) at DINOv2's 112 px."""
    config = DataConfig(source="fashion_mnist", num_images=200, holdout_fraction=0.0)
    dataset = fashion_mnist(config, DINOV2_112)
    indices = pool_indices(dataset, config).tolist()
    batches = list(DataLoader(Subset(dataset, indices), batch_size=32))
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert images.shape == (200, 3, 112, 112) and images.dtype == torch.float32
    assert torch.equal(images, torch.stack([per_image_array(dataset, i) for i in indices]))
    assert labels.tolist() == dataset.targets[indices].tolist()
    assert torch.equal(dataset[indices[7]][0], images[7])  # single access is the batch path of one


@pytest.mark.parametrize("shape", [(24, 28, 28), (24, 28, 28, 3), (24, 90, 70, 3)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [112, 32])
def test_array_batches_equal_per_image(shape, interpolation, size):
    """Gray and RGB (MedMNIST-style) arrays, up- and downsampling, both interpolations."""
    pixels = np.random.default_rng(len(shape) + size).integers(0, 256, shape, dtype=np.uint8)
    dataset = ArrayImages(pixels, np.arange(len(pixels)) % 3, {**DINOV2_112, "input_size": (3, size, size),
                                                                "interpolation": interpolation})
    batch = dataset.__getitems__([5, 0, 23, 5])
    assert [label for _, label in batch] == [2, 0, 2, 2]
    assert torch.equal(torch.stack([image for image, _ in batch]),
                       torch.stack([per_image_array(dataset, i) for i in (5, 0, 23, 5)]))


def test_images_of_different_sizes_are_preprocessed_one_by_one():
    """Public photo crops differ in size: a batch of them still comes back, each as the per-image path makes it."""
    photos = PublicPhotos(6, img_size=32)
    assert len({np.asarray(photos.data[i]).shape for i in range(6)}) > 1
    batch = photos.__getitems__(list(range(6)))
    assert all(torch.equal(image, per_image_array(photos, i)) for i, (image, _) in enumerate(batch))


def test_synthetic_batches_equal_per_image():
    dataset = SyntheticImages(40, 32, seed=3)
    batch = next(iter(DataLoader(Subset(dataset, list(range(3, 40))), batch_size=37)))
    expected = [per_image_synthetic(dataset, i) for i in range(3, 40)]
    assert torch.equal(batch[0], torch.stack([image for image, _ in expected]))
    assert batch[1].tolist() == [label for _, label in expected]
