"""The public-photo prior's data: bundled photos only, seeded crops, the sites' preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tba_fed import TBAInputError
from tba_fed.calibrate import collect_span_stats
from tba_fed.data import data_config
from tba_fed.plan import Span
from tba_fed.public_images import MIN_PHOTOS, PHOTOS, PublicPhoto, PublicPhotos, load_photos, public_loader


def _stack(dataset: PublicPhotos) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_every_listed_photo_is_bundled_and_rgb():
    photos = load_photos()
    assert len(photos) == len(PHOTOS) == 26 >= MIN_PHOTOS
    assert [name for name, _ in photos] == [p.name for p in PHOTOS]
    for _, pixels in photos:
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
        assert min(pixels.shape[:2]) >= 170  # no tiny images: a 30% crop still has >= 51 px
        assert pixels.std() > 10  # not blank
    camera = dict(photos)["camera"]  # grayscale source replicated to 3 channels
    assert np.array_equal(camera[..., 0], camera[..., 1]) and np.array_equal(camera[..., 0], camera[..., 2])
    assert load_photos() is photos  # read once per process


def test_crops_are_seeded_and_prefix_stable():
    a, b = _stack(PublicPhotos(8, img_size=24, seed=0)), _stack(PublicPhotos(8, img_size=24, seed=0))
    assert torch.equal(a, b)
    longer = PublicPhotos(20, img_size=24, seed=0)
    assert torch.equal(_stack(longer)[:8], a)  # crop i depends on (seed, i) only
    other = _stack(PublicPhotos(8, img_size=24, seed=1))
    assert all(not torch.allclose(a[i], other[i]) for i in range(8))


def test_crop_geometry_and_photo_balance():
    dataset = PublicPhotos(260, img_size=16, seed=3)
    photos = dict(load_photos())
    fractions = []
    for i in range(len(dataset)):
        crop = np.asarray(dataset.crops[i])
        shorter = min(photos[dataset.photo_name(i)].shape[:2])
        assert crop.shape[0] == crop.shape[1]  # square, resized to a square input
        fractions.append(crop.shape[0] / shorter)
    assert 0.3 - 1e-2 <= min(fractions) < 0.35 and 0.95 < max(fractions) <= 1.0
    counts = np.unique([dataset.photo_name(i) for i in range(len(dataset))], return_counts=True)[1]
    assert len(counts) == 26 and set(counts) == {10}  # round-robin: 260 crops = 10 of each image


def test_shapes_labels_and_the_models_preprocessing(tiny_vit):
    dataset = PublicPhotos.from_model(tiny_vit, 10)
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0
    cfg = data_config(tiny_vit)  # timm's vit_tiny config: mean = std = 0.5, so pixels in [0, 1] map to [-1, 1]
    assert dataset.mean.flatten().tolist() == list(cfg["mean"]) == [0.5] * 3
    batch = _stack(dataset)
    assert batch.min() >= -1.0 - 1e-6 and batch.max() <= 1.0 + 1e-6
    assert PublicPhotos.from_model(tiny_vit, 2, img_size=48)[1][0].shape == (3, 48, 48)
    with pytest.raises(IndexError):
        dataset[10]


def test_imagenet_normalisation_gives_roughly_standard_channels():
    # photos are ImageNet-like, so ImageNet's mean/std should roughly standardise them (seed 0: mean ≈ (0.00, -0.19, -0.09),
    # std ≈ (1.12, 0.95, 0.99))
    batch = _stack(PublicPhotos(68, img_size=32, seed=0))
    mean, std = batch.mean(dim=(0, 2, 3)), batch.std(dim=(0, 2, 3))
    assert torch.all(mean > -0.35) and torch.all(mean < 0.25), mean
    assert torch.all(std > 0.8) and torch.all(std < 1.3), std


def test_loader_feeds_the_statistics(tiny_vit):
    from tba_fed import ViTAdapter

    loader = public_loader(tiny_vit, num_images=12, batch_size=5, seed=2)
    images, labels = next(iter(loader))
    assert images.shape == (5, 3, 32, 32) and labels.tolist() == [0] * 5
    assert [len(x) for x, _ in loader] == [5, 5, 2]
    stats = collect_span_stats(ViTAdapter(tiny_vit), loader, [Span(1, 3)])[Span(1, 3)]
    assert stats.images == 12 and stats.tokens == 12 * 17  # 16 patches + class token


def test_errors(tmp_path):
    missing = tuple(PublicPhoto(f"gone{i}", "skimage", f"data/gone{i}.png") for i in range(3))
    with pytest.raises(TBAInputError, match=r"public_images: only 0 of 3 bundled photos .*\(pip install scikit-image"):
        load_photos(missing)
    with pytest.raises(TBAInputError, match=r"only 9 of 12 bundled photos are available, at least 10"):
        load_photos(PHOTOS[:9] + missing)
    with pytest.raises(TBAInputError, match=r"only 0 of 1"):
        load_photos((PublicPhoto("nowhere", "no_such_package_xyz", "a.png"),))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(TBAInputError, match=r"only 0 of 1"):
        load_photos((PublicPhoto("broken", "tba_fed", str(broken)),))  # absolute path: unreadable file is skipped
    with pytest.raises(TBAInputError, match="num_images: must be >= 1"):
        PublicPhotos(0)
    with pytest.raises(TBAInputError, match="std > 0"):
        PublicPhotos(4, std=(0.5, 0.0, 0.5))


def test_loader_rejects_a_bad_batch_size(tiny_vit):
    with pytest.raises(TBAInputError, match="batch_size: must be >= 1"):
        public_loader(tiny_vit, batch_size=0)
