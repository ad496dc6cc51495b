import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from tba_fed import TBAInputError
from tba_fed.config import DataConfig
from tba_fed.data import FASHION_MNIST_DIR, build_dataset, data_config


@pytest.fixture(scope="module")
def model32():
    from tba_fed import ModelConfig, create_model

    from conftest import TINY

    return create_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY))


def _normalised(model, pixels: np.ndarray) -> torch.Tensor:
    cfg = data_config(model)
    return ((torch.tensor(pixels / 255.0, dtype=torch.float32) - torch.tensor(cfg["mean"]).view(3, 1, 1))
            / torch.tensor(cfg["std"]).view(3, 1, 1))


def test_fashion_mnist_counts_and_items(model32):
    train = build_dataset(DataConfig(source="fashion_mnist", split="train"), model32)
    test = build_dataset(DataConfig(source="fashion_mnist", split="test"), model32)
    assert len(train) == 60_000 and len(test) == 10_000
    assert np.array_equal(np.bincount(train.targets), np.full(10, 6_000))
    assert np.array_equal(np.bincount(test.targets), np.full(10, 1_000))
    with gzip.open(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz") as handle:
        assert handle.read()[8] == train[0][1]
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 10
    assert torch.equal(image[0], image[1])  # grayscale replicated to 3 channels


def test_medmnist_npz_gray_and_rgb(tmp_path, model32):
    rng = np.random.default_rng(0)
    for shape in ((6, 28, 28), (6, 28, 28, 3)):
        path = tmp_path / f"set{len(shape)}.npz"
        arrays = {f"{s}_{k}": (rng.integers(0, 256, shape, dtype=np.uint8) if k == "images"
                               else rng.integers(0, 4, (6, 1))) for s in ("train", "val", "test") for k in ("images", "labels")}
        np.savez(path, **arrays)
        data = build_dataset(DataConfig(source="medmnist", path=path, split="val"), model32)
        assert len(data) == 6 and np.array_equal(data.targets, arrays["val_labels"].reshape(-1))
        image, label = data[2]
        assert image.shape == (3, 32, 32) and label == arrays["val_labels"][2, 0]
    # a constant image survives preprocessing exactly (resize of a constant is the constant)
    np.savez(tmp_path / "flat.npz", train_images=np.full((1, 28, 28), 200, np.uint8), train_labels=np.zeros(1))
    image, _ = build_dataset(DataConfig(source="medmnist", path=tmp_path / "flat.npz"), model32)[0]
    assert torch.allclose(image, _normalised(model32, np.full((3, 32, 32), 200.0)), atol=1e-5)
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(TBAInputError, match=r"data.path: .*bad.npz lacks \['train_labels'\]"):
        build_dataset(DataConfig(source="medmnist", path=tmp_path / "bad.npz"), model32)


def test_missing_sources_name_the_path(tmp_path, model32):
    with pytest.raises(TBAInputError, match="data.path: .*nowhere.*download: true"):
        build_dataset(DataConfig(source="cifar10", path=tmp_path / "nowhere"), model32)
    with pytest.raises(TBAInputError, match="dataset-fashion-mnist"):
        build_dataset(DataConfig(source="fashion_mnist", path=tmp_path), model32)
    with pytest.raises(TBAInputError, match="data.path: .*does not exist"):
        build_dataset(DataConfig(source="medmnist", path=tmp_path / "none.npz"), model32)
    with pytest.raises(ValueError, match="needs path"):
        DataConfig(source="image_folder")


def test_image_folder_and_synthetic_targets(tmp_path, model32):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / label / f"{i}.png")
    folder = build_dataset(DataConfig(source="image_folder", path=tmp_path), model32)
    assert list(folder.targets) == [0, 0, 0, 1, 1, 1] and folder[4][0].shape == (3, 32, 32)
    synthetic = build_dataset(DataConfig(num_images=20), model32)
    assert [synthetic[i][1] for i in range(20)] == list(synthetic.targets)
