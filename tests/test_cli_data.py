"""`--data` takes every source the README lists: synthetic, fashion_mnist, an image folder, a MedMNIST .npz, and
SOURCE:PATH for the sources that need a path (cifar10, cifar100, medmnist, image_folder)."""

import json

import numpy as np
import pytest

from tba_fed.cli import _config_from_args, build_parser, main

from test_cli import TINY_FLAGS


def _config(data: str):
    return _config_from_args(build_parser().parse_args(["analyze", *TINY_FLAGS, "--data", data]))


@pytest.mark.parametrize(("data", "source", "path"), [
    ("cifar10:/data/cifar", "cifar10", "/data/cifar"), ("cifar100:relative/root", "cifar100", "relative/root"),
    ("medmnist:/data/pneumonia.bin", "medmnist", "/data/pneumonia.bin"), ("image_folder:/x:y", "image_folder", "/x:y"),
    ("/data/pneumonia.npz", "medmnist", "/data/pneumonia.npz"), ("fashion_mnist", "fashion_mnist", None),
])
def test_data_flag_names_the_source_and_its_path(data, source, path):
    config = _config(data)
    assert config.data.source == source and (str(config.data.path) if config.data.path else None) == path


def test_cifar_reaches_the_cifar_reader_not_the_image_folder_one(tmp_path, capsys):
    """Before SOURCE:PATH, `--data cifar10:ROOT` was taken for an image folder named 'cifar10:ROOT'."""
    assert main(["analyze", *TINY_FLAGS, "--data", f"cifar10:{tmp_path / 'none'}", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"tba-fed: error: data.path: {tmp_path / 'none'}: ") and "cifar10 python version" in err
    assert main(["analyze", *TINY_FLAGS, "--data", "cifar100:", "-o", str(tmp_path / "out")]) == 2
    assert "--data: 'cifar100:' names no path" in capsys.readouterr().err


def test_a_medmnist_file_by_any_name_is_analysed(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "pneumonia.data"  # not .npz: only medmnist: says what it is
    with open(path, "wb") as handle:
        np.savez(handle, train_images=rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
                 train_labels=rng.integers(0, 2, (12, 1)))
    out = tmp_path / "out"
    assert main(["analyze", *TINY_FLAGS, "--data", f"medmnist:{path}", "--num-images", "12", "-o", str(out)]) == 0
    assert json.loads((out / "similarity.json").read_text())["images"] > 0
