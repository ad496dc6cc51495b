"""Bad-input campaign (issue #6, point 5), part 2 of 3: a site's data (see part 1 for the conventions).

| #  | malformed input                                                | refused as (field)                       |
|----|----------------------------------------------------------------|------------------------------------------|
| 28 | a file in an image folder that is not an image (CLI compress)  | data.path, naming the file               |
| 29 | a truncated image, met by a site mid-release                   | data.path, naming the file; nothing sent |
| 30 | an empty image folder                                          | data.path                                |
| 31 | a class folder without images                                  | data.path                                |
| 32 | a .npz that is not a zip of arrays (garbage, a plain .npy)     | data.path                                |
| 33 | a .npz holding object (pickled) arrays                         | data.path                                |
| 34 | a .npz whose images are not uint8                              | data.path                                |
| 35 | a .npz with more labels than images                            | data.path                                |
| 36 | a .npz with negative or fractional labels                      | data.path                                |
| 37 | a Fashion-MNIST IDX file that is not gzip                      | data.path                                |
| 38 | an IDX labels file where the images file should be             | data.path                                |
| 39 | fewer images than the site's policy minimum                    | privacy.min_images (ledger not written)  |
| 40 | fewer images than the server's min_images_per_site             | statistics.images (run fails, no output) |
| 41 | a held-out fraction that leaves no calibration image           | data                                     |
| –  | mixed image sizes and modes (gray, RGBA, 3x3 to 50x10 px)      | accepted: the model's transform resizes  |

Also covered elsewhere: a .npz without the split's keys, missing files and folders (test_data_sources.py,
test_cli.py).
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tba_fed import LinearMap, ModelConfig, Span, create_model
from tba_fed.cli import main
from tba_fed.config import DataConfig
from tba_fed.data import SyntheticImages, build_dataset, calibration_split, make_loader
from tba_fed.federation.config import load_federated_config
from tba_fed.errors import FederationError
from tba_fed.federation.server import run_server
from tba_fed.federation.site import Site, resolve_site, run_spec, statistics_reply
from tba_fed.federation.site_context import SiteContext
from tba_fed.plan import parse_plan
from tba_fed.privacy.policy import PolicyRefusal, PrivacyRequest, SitePolicy
from tba_fed.privacy.site_state import initialise
from tba_fed.selection import development_key

from conftest import TINY, loader
from refusal import refused, unchanged
from test_server_rounds import InProcessGrid, server_identity  # noqa: F401 - the fixture gives messages a run id

MODEL = ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY)
TINY_FLAGS = ["--model", "vit_tiny_patch16_224", *[f for k, v in TINY.items() for f in ("--model-arg", f"{k}={v}")]]


@pytest.fixture(scope="module")
def model():
    return create_model(MODEL)


def _images(folder, count: int = 3, size=(20, 24), seed: int = 0, suffix: str = ".png") -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}{suffix}")


def _folder_config(root, **data) -> DataConfig:
    return DataConfig(source="image_folder", path=root, **data)


def test_28_a_file_that_is_not_an_image_stops_compress_naming_it(tmp_path, capsys):
    for label in ("cat", "dog"):
        _images(tmp_path / "images" / label, count=4)
    bad = tmp_path / "images" / "dog" / "scan-042.png"
    bad.write_bytes(b"%PDF-1.4 this is a report, not a scan")
    out = tmp_path / "out"
    with unchanged([out]):
        code = main(["compress", *TINY_FLAGS, "--data", str(tmp_path / "images"), "--num-images", "9", "--batch-size",
                     "4", "--plan", "1->2", "-o", str(out)])
    assert code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"tba-fed: error: data.path: {bad} cannot be read as an image "
                                                        f"(cannot identify image file '{bad}') (remove or replace the file)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no output, no temporary directory


def test_29_a_truncated_image_stops_a_site_before_it_sends_anything(tmp_path, model):
    _images(tmp_path / "images" / "a", count=5, size=(40, 48))
    cut = tmp_path / "images" / "a" / "3.png"
    cut.write_bytes(cut.read_bytes()[:4000])
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(yaml.safe_dump({
        "name": "hospital-a", "output": str(tmp_path / "site-out"),
        "data": {"source": "image_folder", "path": str(tmp_path / "images"), "holdout_fraction": 0.0, "batch_size": 2},
        "privacy": {"require_dp": False, "min_images": 1, "ledger": str(tmp_path / "ledger.json")},
        "state": str(tmp_path / "state")}))
    initialise(tmp_path / "state", "hospital-a", tmp_path / "ledger.json")  # tba-fed site init
    site = resolve_site(SiteContext({"site-config": str(site_yaml)}, {}), model, {"profile": "production"})
    with refused("data.path", fix="remove or replace the file", untouched=[tmp_path]) as err:
        statistics_reply(model, site, parse_plan("1->2", 6), "all", run_spec("run-1", {}))
    assert str(err.value).startswith(f"data.path: {cut} cannot be read as an image (image file is truncated")


def test_30_an_empty_image_folder(tmp_path, model):
    with refused("data.path", fix="put images in one sub-folder per class, or directly in the folder if unlabeled "
                                  "(calibration only)", untouched=[tmp_path]) as err:
        build_dataset(_folder_config(tmp_path), model)
    assert f"Couldn't find any class folder nor image in {tmp_path}" in str(err.value)


def test_31_a_class_folder_without_images(tmp_path, model):
    _images(tmp_path / "benign")
    (tmp_path / "malignant").mkdir()
    (tmp_path / "malignant" / "notes.txt").write_text("images to follow")
    with refused("data.path", fix="put images in one sub-folder per class", untouched=[tmp_path]) as err:
        build_dataset(_folder_config(tmp_path), model)
    assert "Found no valid file for the classes malignant" in str(err.value)


def test_mixed_image_sizes_and_modes_are_resized_by_the_model_transform(tmp_path, model):
    """Not a refusal: images of any size and mode reach the model at its input size, so batches collate."""
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((50, 10), np.uint8)).save(tmp_path / "a" / "gray.png")
    Image.fromarray(np.full((3, 3, 4), 200, np.uint8)).save(tmp_path / "a" / "rgba.png")
    _images(tmp_path / "a", count=2, size=(300, 17), suffix=".jpg")
    Image.fromarray(np.zeros((64, 64), np.uint8)).convert("P").save(tmp_path / "a" / "palette.bmp")
    config = _folder_config(tmp_path, batch_size=5)
    batches = list(make_loader(build_dataset(config, model), config))
    assert [tuple(b[0].shape) for b in batches] == [(5, 3, 32, 32)]


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


U8 = np.zeros((4, 8, 8), np.uint8)


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(b"PK\x03\x04 not really a zip") and p,                                            # 32
     " is not a readable .npz of plain arrays (File is not a zip file)"),
    (lambda p: _npz(p, train_images=np.array([object()] * 4), train_labels=np.zeros(4)),                       # 33
     " is not a readable .npz of plain arrays (Object arrays cannot be loaded when allow_pickle=False)"),
    (lambda p: np.save(p.with_suffix(".npy"), U8) or p.with_suffix(".npy").rename(p),                         # 32
     " lacks ['train_images', 'train_labels']"),
    (lambda p: _npz(p, train_images=U8.astype(np.float32), train_labels=np.zeros(4)),                         # 34
     ": expected uint8 images [N, H, W(, 3)] and N labels, got float32 (4, 8, 8) and (4,)"),
    (lambda p: _npz(p, train_images=U8, train_labels=np.zeros(5)),                                              # 35
     ": expected uint8 images [N, H, W(, 3)] and N labels, got uint8 (4, 8, 8) and (5,)"),
    (lambda p: _npz(p, train_images=U8, train_labels=np.array([0, 1, -1, 2])),                                  # 36
     ": train_labels must be non-negative integers, got int64 [0, 1, -1, 2]..."),
    (lambda p: _npz(p, train_images=U8, train_labels=np.array([0, 0.5, 1, 2])),                                 # 36
     ": train_labels must be non-negative integers, got float64 [0.0, 0.5, 1.0, 2.0]..."),
])
def test_32_36_malformed_npz(tmp_path, model, make, message):
    path = make(tmp_path / "scans.npz")
    with refused("data.path", untouched=[tmp_path]) as err:
        build_dataset(DataConfig(source="medmnist", path=path), model)
    assert str(err.value).startswith(f"data.path: {path}{message}")


def test_37_idx_file_that_is_not_gzip(tmp_path, model):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x00\x00\x08\x03 raw IDX, never compressed")
    fix = "reinstall dataset-fashion-mnist or point data.path at intact files"
    with refused("data.path", fix=fix, untouched=[tmp_path]) as err:
        build_dataset(DataConfig(source="fashion_mnist", path=tmp_path), model)
    assert str(err.value).startswith(f"data.path: {tmp_path / 'train-images-idx3-ubyte.gz'} is not a gzipped IDX file (")


def test_38_idx_labels_where_images_should_be(tmp_path, model):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as handle:
            handle.write((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([1, 2, 3]))
    with refused("data.path", untouched=[tmp_path]) as err:
        build_dataset(DataConfig(source="fashion_mnist", path=tmp_path), model)
    assert str(err.value) == (f"data.path: {tmp_path / 'train-images-idx3-ubyte.gz'} is not an IDX file of the "
                              "expected kind (magic 0x801, expected 0x803)")


def test_39_fewer_images_than_the_site_policy_minimum(tmp_path, model):
    policy = SitePolicy(epsilon=8.0, min_images=50, ledger=tmp_path / "ledger.json")
    site = Site("hospital-a", loader(24), None, tmp_path / "out", policy)
    request = PrivacyRequest(epsilon=1.0, delta=1e-5, releases=("statistics",), clip_spans={"1->2": (1.0,) * 5})
    run = run_spec("run-1", {"privacy": request.to_json()})
    with refused("privacy.min_images", error=PolicyRefusal, untouched=[tmp_path]) as err:
        statistics_reply(model, site, parse_plan("1->2", 6), "all", run, priors={"linear": {Span(1, 2): LinearMap.identity(48)}})
    assert str(err.value) == ("privacy.min_images: refused by the site's privacy policy: the calibration part of this "
                              "release would summarise fewer images than the site's minimum per release (50)")
    assert "24" not in str(err.value)  # the count stays at the site


def test_40_fewer_images_than_the_server_minimum_fails_the_run_and_writes_nothing(tmp_path):
    grid = InProcessGrid(tmp_path, {1: "good", 2: "good"}, images=12)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL.model_dump(mode="json"), "plan": "1->2",
                                    "federation": {"num_sites": 2, "min_sites": 1, "min_images_per_site": 20,
                                                   "round_timeout": 5},
                                    "output": str(tmp_path / "server")}))
    with unchanged([tmp_path / "server"]), pytest.raises(FederationError) as err:
        run_server(grid, load_federated_config(path))
    for site in ("site-1", "site-2"):
        assert (f"{site}: rejected (statistics.images: summarises 12 images, the minimum per site is 20)"
                in str(err.value))


def test_41_holdout_fraction_leaving_no_calibration_image(model):
    config = DataConfig(source="synthetic", num_images=3, holdout_fraction=0.99)
    with refused("data", fix="add images, raise data.sample_rate or lower data.holdout_fraction") as err:
        calibration_split(SyntheticImages(3, 32), config, development_key(0))
    assert str(err.value).startswith("data: no image was selected for calibration (of 3, sample rate 1, held-out "
                                     "fraction 0.99)")
    with refused("data.source", fix="use one of tba-fed's data sources"):  # no bytes to decide from: no split
        calibration_split(torch.utils.data.TensorDataset(torch.zeros(1, 3, 32, 32), torch.zeros(1)), config,
                          development_key(0))
