"""Medical images (issue #15, §5): PNG and TIFF read with their real bit depth, DICOM through pydicom, flat folders
of unlabeled images for calibration, and what preflight reports of a site's images.

Every image is made here: 16-bit PNG and 8-bit images by Pillow, TIFF by tifffile, DICOM by pydicom.

| malformed input                                          | refused as (field), one line naming the file          |
|----------------------------------------------------------|-------------------------------------------------------|
| a multi-frame DICOM                                      | data.path: holds N frames                             |
| a DICOM compressed with JPEG-LS (no decoder installed)   | data.path: compressed (JPEG-LS Lossless ...)          |
| a .dcm file that is not DICOM                            | data.path: is not a DICOM file                        |
| a truncated 16-bit PNG                                   | data.path: cannot be read as an image                 |
| a truncated 16-bit colour PNG                            | data.path: is a 16-bit PNG that cannot be decoded     |
| a multi-page TIFF, an animated PNG                       | data.path: holds N pages / frames                     |
| images beside class folders                              | data.path: both in class folders and beside them      |
| the probe on unlabeled images                            | data.path: the images have no labels                  |
| a non-IID partition of unlabeled images                  | federation.partition.scheme                           |
| 8-bit beside 16-bit, DICOM beside PNG (preflight)        | PROBLEM data.images: mixed encodings                  |
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless, generate_uid
from timm.data import create_transform

from tba_fed import ModelConfig, create_model
from tba_fed.config import DataConfig
from tba_fed.data import UNLABELED, build_dataset, calibration_split, data_config, make_loader
from tba_fed.federation.site import probe_reply, resolve_site, run_spec, statistics_reply
from tba_fed.federation.site_context import SiteContext
from tba_fed.images import read_image
from tba_fed.partition import partition
from tba_fed.plan import parse_plan
from tba_fed.privacy.site_state import initialise
from tba_fed.probe import ProbeStats
from tba_fed.selection import development_key

from conftest import TINY
from refusal import refused, run_cli

MODEL = ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY)
TINY_FLAGS = ["--model", "vit_tiny_patch16_224", *[f for k, v in TINY.items() for f in ("--model-arg", f"{k}={v}")]]


@pytest.fixture(scope="module")
def model():
    return create_model(MODEL)


def twelve_bit(seed: int = 0, shape=(40, 48)) -> np.ndarray:
    """A 12-bit scan: values spread over 0..4095, the extremes included."""
    pixels = np.random.default_rng(seed).integers(0, 4096, shape, dtype=np.uint16)
    pixels[0, 0], pixels[0, 1] = 0, 4095
    return pixels


def write_dicom(path, stored: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                signed: bool = False, slope: float | None = None, intercept: float | None = None,
                syntax=ExplicitVRLittleEndian, pixel_data: bytes | None = None):
    """A CT image as a scanner writes it: 16-bit allocated, `bits_stored` used, optional linear rescale."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    ds.Rows, ds.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, int(signed)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
    ds.PixelData = pixel_data if pixel_data is not None else stored.astype("<i2" if signed else "<u2").tobytes()
    ds["PixelData"].VR = "OB" if pixel_data is not None else "OW"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_12_bit_png_is_read_unclipped(tmp_path):
    """The issue's bug: Pillow's RGB conversion clipped every value above 255, so a 12-bit scan came out 94%
    saturated. Now each value v reaches the model's transform as v / 65535 (the 16-bit container's full scale)."""
    pixels = twelve_bit()
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode == "I;16"  # really a 16-bit PNG
    image = read_image(str(tmp_path / "scan.png"))
    assert isinstance(image, torch.Tensor) and image.shape == (3, 40, 48)
    expected = torch.from_numpy(pixels.astype(np.float32) / 65535.0)
    for channel in image:
        assert torch.equal(channel, expected)
    assert float(image.max()) == pytest.approx(4095 / 65535) and float(image.min()) == 0.0
    assert len(torch.unique(image)) == len(np.unique(pixels))  # every one of the distinct values kept apart


def test_a_12_bit_png_reaches_the_model_as_its_values(tmp_path, model):
    """Through the image folder and timm's eval transform: the same as the transform of the unclipped floats."""
    pixels = twelve_bit()
    (tmp_path / "a").mkdir()
    Image.fromarray(pixels).save(tmp_path / "a" / "scan.png")
    dataset = build_dataset(DataConfig(source="image_folder", path=tmp_path), model)
    transform = create_transform(**data_config(model), is_training=False)
    expected = transform(torch.from_numpy(pixels.astype(np.float32) / 65535.0).expand(3, 40, 48))
    image, label = dataset[0]
    assert label == 0 and torch.allclose(image, expected, atol=0, rtol=0)
    clipped = transform(Image.fromarray(np.minimum(pixels, 255).astype(np.uint8)).convert("RGB"))  # the old reading
    assert (image - clipped).abs().max() > 0.5


def test_16_bit_tiff_gray_and_colour(tmp_path):
    gray = twelve_bit(1) * 16  # the full 16 bits
    colour = np.stack([twelve_bit(s) * 16 + s for s in (2, 3, 4)], axis=-1)
    tifffile.imwrite(tmp_path / "gray.tif", gray)
    tifffile.imwrite(tmp_path / "colour.tiff", colour, photometric="rgb")
    assert Image.open(tmp_path / "colour.tiff").mode == "RGB"  # what Pillow alone would have kept: 8 bits
    assert torch.equal(read_image(str(tmp_path / "gray.tif"))[1], torch.from_numpy(gray / np.float32(65535)))
    read = read_image(str(tmp_path / "colour.tiff"))
    assert torch.equal(read, torch.from_numpy(colour.astype(np.float32) / 65535.0).permute(2, 0, 1))


@pytest.mark.parametrize("channels", [2, 3, 4], ids=["gray-alpha", "rgb", "rgba"])
def test_16_bit_colour_and_gray_alpha_png(tmp_path, channels):
    """Pillow opens these as 8-bit images (their high bytes); they are read with all 16 bits, alpha dropped."""
    pixels = np.stack([twelve_bit(s) * 16 + s for s in range(channels)], axis=-1)
    path = png16(tmp_path / "scan.png", pixels)
    assert Image.open(path).mode in ("LA", "RGB", "RGBA")  # what Pillow alone would have kept: 8 bits
    expected = pixels[..., 0] if channels == 2 else pixels[..., :3]
    expected = torch.from_numpy(expected.astype(np.float32) / 65535.0)
    read = read_image(str(path))
    assert torch.equal(read, expected.expand(3, *expected.shape) if channels == 2 else expected.permute(2, 0, 1))


def test_8_bit_images_are_read_as_before(tmp_path, model):
    """8-bit RGB and gray PNG: the Pillow RGB image timm's transform always received, so the same tensors."""
    rng = np.random.default_rng(5)
    (tmp_path / "a").mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 34, 3), dtype=np.uint8)).save(tmp_path / "a" / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (30, 34), dtype=np.uint8)).save(tmp_path / "a" / "gray.png")
    dataset = build_dataset(DataConfig(source="image_folder", path=tmp_path), model)
    transform = create_transform(**data_config(model), is_training=False)
    for index, name in enumerate(("gray.png", "rgb.png")):
        with Image.open(tmp_path / "a" / name) as before:
            assert torch.equal(dataset[index][0], transform(before.convert("RGB")))
    assert isinstance(read_image(str(tmp_path / "a" / "rgb.png")), Image.Image)


def test_dicom_monochrome2_with_rescale_slope_and_intercept(tmp_path):
    """Stored 0..4095 (12 bits), HU = 1 * stored - 1024: the full range -1024..3071 HU maps to [0, 1]."""
    stored = twelve_bit(6)
    path = write_dicom(tmp_path / "ct.dcm", stored, slope=1.0, intercept=-1024.0)
    read = read_image(str(path))
    hu = stored.astype(np.float64) - 1024.0
    assert torch.allclose(read[0], torch.from_numpy(((hu + 1024.0) / 4095.0).astype(np.float32)), atol=0, rtol=0)
    assert float(read.min()) == 0.0 and float(read.max()) == 1.0  # stored 0 and 4095 are the range's ends


def test_dicom_slope_is_applied(tmp_path):
    """A negative slope (stored 0 is the largest value) inverts; a slope of 2 with a signed range scales."""
    stored = twelve_bit(7)
    inverted = read_image(str(write_dicom(tmp_path / "neg.dcm", stored, slope=-1.0, intercept=0.0)))
    assert torch.allclose(inverted[0], torch.from_numpy((1.0 - stored / 4095.0).astype(np.float32)), atol=1e-7)
    signed = (stored.astype(np.int16) - 2048)
    doubled = read_image(str(write_dicom(tmp_path / "signed.dcm", signed, signed=True, slope=2.0, intercept=10.0)))
    value, lo, hi = 2.0 * signed + 10.0, 2.0 * -2048 + 10.0, 2.0 * 2047 + 10.0
    assert torch.allclose(doubled[0], torch.from_numpy(((value - lo) / (hi - lo)).astype(np.float32)), atol=1e-7)


def test_dicom_monochrome1_is_inverted(tmp_path):
    stored = twelve_bit(8)
    mono2 = read_image(str(write_dicom(tmp_path / "m2.dcm", stored)))
    mono1 = read_image(str(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1")))
    assert torch.allclose(mono1, 1.0 - mono2, atol=1e-7)
    assert float(mono1.flatten()[0]) == 1.0  # stored 0 is white in MONOCHROME1


def _compress(tmp_path) -> list[str]:
    return ["compress", *TINY_FLAGS, "--data", str(tmp_path / "images"), "--num-images", "20", "--batch-size", "4",
            "--plan", "1->2", "-o", str(tmp_path / "out")]


def _refusal_line(tmp_path, capsys, make):
    """A class folder of good 16-bit PNGs plus one bad file made by `make(folder)`: `tba-fed compress` exits 2
    with one line naming the file, no traceback, no output directory. Returns the bad file and that line."""
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(twelve_bit(i)).save(folder / f"{i}.png")
    bad = make(folder)
    code, out, err = run_cli(_compress(tmp_path), capsys, untouched=[tmp_path / "images"])
    assert code == 2, err
    assert "Traceback" not in err + out and err.count("error") == 1, err  # the INFO lines before it aside
    assert not (tmp_path / "out").exists()
    return bad, err.splitlines()[-1]


REPLACE = "remove or replace the file"


def _multi_frame(folder):
    return write_dicom(folder / "series.dcm", np.stack([twelve_bit(1), twelve_bit(2), twelve_bit(3)]))


def _jpeg_ls(folder):
    return write_dicom(folder / "jls.dcm", twelve_bit(1), syntax=JPEGLSLossless,
                       pixel_data=encapsulate([b"\xff\xd8\xff\xf7 not decodable without a JPEG-LS plugin \xff\xd9"]))


def _not_dicom(folder):
    (folder / "report.dcm").write_bytes(b"patient report, exported under the wrong name" * 10)
    return folder / "report.dcm"


def _truncated_png(folder):
    Image.fromarray(twelve_bit(9, (200, 200))).save(folder / "cut.png")
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:3000])
    return folder / "cut.png"


def png16(path, pixels: np.ndarray):
    """A 16-bit PNG written by hand (gray, gray+alpha, RGB or RGBA): Pillow cannot write 16-bit colour."""
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    height, width, channels = pixels.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 16, {1: 0, 2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def _truncated_colour_png_16(folder):
    path = png16(folder / "rgb16.png", np.stack([twelve_bit(s, (60, 50)) * 16 for s in (1, 2, 3)], axis=-1))
    path.write_bytes(path.read_bytes()[:2000])
    return path


def _multi_page_tiff(folder):
    tifffile.imwrite(folder / "stack.tif", np.stack([twelve_bit(1), twelve_bit(2)]))
    return folder / "stack.tif"


def _animated_png(folder):
    frames = [Image.fromarray(np.full((8, 8), 40 * i, np.uint8)) for i in range(3)]
    frames[0].save(folder / "cine.png", save_all=True, append_images=frames[1:])
    return folder / "cine.png"


@pytest.mark.parametrize("make,message,fix", [
    (_multi_frame, "holds 3 frames: one image per file is read", "split it into one file per frame, or remove it"),
    (_jpeg_ls, "is compressed (JPEG-LS Lossless Image Compression) and no installed decoder reads it",
     "export it uncompressed, or install one of: gdcm>=3.0.10; pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1; "
     "numpy and pyjpegls>=1.2"),
    (_not_dicom, "is not a DICOM file (", REPLACE),
    (_truncated_png, "cannot be read as an image (", REPLACE),
    (_truncated_colour_png_16, "is a 16-bit PNG that cannot be decoded (", "save it uncompressed or deflate-compressed"),
    (_multi_page_tiff, "holds 2 pages: one image per file is read", "split it into one file per page, or remove it"),
    (_animated_png, "holds 3 frames: one image per file is read", "split it into one file per frame, or remove it"),
], ids=["multi-frame-dicom", "jpeg-ls-without-decoder", "not-dicom", "truncated-png", "truncated-16-bit-colour-png",
        "multi-page-tiff", "animated-png"])
def test_bad_medical_files_stop_compress_in_one_line(tmp_path, capsys, make, message, fix):
    bad, line = _refusal_line(tmp_path, capsys, make)
    if message.endswith("("):  # the decoder's own reason follows: check the line's shape around it
        assert line.startswith(f"tba-fed: error: data.path: {bad} {message}") and line.endswith(f") ({fix})"), line
    else:
        assert line == f"tba-fed: error: data.path: {bad} {message} ({fix})"


def test_a_flat_folder_calibrates_without_labels(tmp_path, capsys, model):
    """No class folders: every image labelled UNLABELED; compress runs; the probe refuses, naming why."""
    for i in range(12):
        Image.fromarray(twelve_bit(i)).save(tmp_path / f"{i}.png")
    config = DataConfig(source="image_folder", path=tmp_path, holdout_fraction=0.0, batch_size=4)
    dataset = build_dataset(config, model)
    assert len(dataset) == 12 and set(dataset.targets) == {UNLABELED} and dataset.unlabeled
    code, out, err = run_cli(["compress", *TINY_FLAGS, "--data", str(tmp_path), "--num-images", "12", "--batch-size",
                              "4", "--plan", "1->2", "-o", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert (tmp_path / "out").is_dir()
    calibration, _ = calibration_split(dataset, config, development_key(0))
    _, labels = next(iter(make_loader(calibration, config)))
    with refused("data.path", fix="put the images in one sub-folder per class to measure accuracy"):
        ProbeStats.zeros(4, 5).update(torch.zeros(len(labels), 4), labels)


def test_a_site_with_a_flat_folder_sends_statistics_and_refuses_the_probe(tmp_path, model):
    """A hospital's unlabeled scans: the span statistics are computed; the probe (federated evaluation) is refused
    in one line, before any sum is sent, and the ledger records no release of it."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        write_dicom(images / f"{i}.dcm", twelve_bit(i), slope=1.0, intercept=-1024.0)
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(yaml.safe_dump({
        "name": "hospital-a", "output": str(tmp_path / "site-out"),
        "data": {"source": "image_folder", "path": str(images), "holdout_fraction": 0.0, "batch_size": 2},
        "privacy": {"require_dp": False, "min_images": 1, "ledger": str(tmp_path / "ledger.json"),
                    "releases": ["statistics", "probe"]},
        "state": str(tmp_path / "state")}))
    initialise(tmp_path / "state", "hospital-a", tmp_path / "ledger.json")
    site = resolve_site(SiteContext({"site-config": str(site_yaml)}, {}), model, {"profile": "production"})
    reply = statistics_reply(model, site, parse_plan("1->2", 6), "all", run_spec("run-1", {}))
    assert len(reply) > 0
    ledger = (tmp_path / "ledger.json").read_bytes()
    with refused("data.path", fix="put the images in one sub-folder per class to measure accuracy") as err:
        probe_reply(model, model, site, 5, run_spec("run-1", {}))
    assert err.value.message.startswith("the images have no labels (a flat folder without class sub-folders)")
    assert (tmp_path / "ledger.json").read_bytes() == ledger


def test_a_non_iid_partition_of_unlabeled_images_is_refused():
    """Dirichlet and shard partitions split by label: unlabeled images have none (iid needs none)."""
    unlabeled = np.full(12, UNLABELED)
    assert [len(p) for p in partition(unlabeled, 3, scheme="iid")] == [4, 4, 4]
    for scheme in ("dirichlet", "shards"):
        with refused("federation.partition.scheme", fix="use scheme iid, or put the images in one sub-folder per class"):
            partition(unlabeled, 3, scheme=scheme)


def test_images_beside_class_folders_are_refused(tmp_path, model):
    (tmp_path / "a").mkdir()
    Image.fromarray(twelve_bit(0)).save(tmp_path / "a" / "0.png")
    Image.fromarray(twelve_bit(1)).save(tmp_path / "stray.png")
    with refused("data.path", fix="move every image into its class folder, or use a flat folder of images without "
                                  "labels", untouched=[tmp_path]) as err:
        build_dataset(DataConfig(source="image_folder", path=tmp_path), model)
    assert err.value.message == (f"{tmp_path} holds images both in class folders (a) and beside them "
                                 f"({tmp_path / 'stray.png'})")


def _site(tmp_path, images) -> str:
    """A development site (no connection) over `images`, its state initialised: preflight reads every image."""
    site = {"name": "hospital-a", "profile": "development", "model": {"name": "vit_tiny_patch16_224", "kwargs": TINY},
            "data": {"source": "image_folder", "path": str(images), "holdout_fraction": 0.0, "batch_size": 4},
            "output": str(tmp_path / "site-out"), "state": str(tmp_path / "state"),
            "privacy": {"require_dp": False, "min_images": 1, "ledger": str(tmp_path / "ledger.json")}}
    initialise(tmp_path / "state", "hospital-a", tmp_path / "ledger.json")
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(site))
    return str(tmp_path / "site.yaml")


def _data_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if " data" in line[:16]]


def test_preflight_reports_formats_depths_and_values(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        write_dicom(images / f"{i}.dcm", twelve_bit(i), slope=1.0, intercept=-1024.0)
    write_dicom(images / "3.dcm", twelve_bit(3), slope=1.0, intercept=-1024.0, photometric="MONOCHROME1")
    code, out, _ = run_cli(["preflight", _site(tmp_path, images)], capsys)
    assert code == 0, out
    assert _data_lines(out) == [
        "OK      data: 4 calibration and 0 held-out images read (min_images 1 each)",
        "OK      data.images: 4 DICOM 12-bit gray images, values -1024..3071 of full scale -1024..3071",
        "NOTE    data.labels: a flat folder without class sub-folders: calibration needs no labels, the probe's accuracy "
        "(federated evaluation) does and will be refused (fix: put the images in one sub-folder per class to measure "
        "accuracy)"]


def test_preflight_notes_12_bit_values_in_a_16_bit_container(tmp_path, capsys):
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(twelve_bit(i)).save(images / f"{i}.png")
    code, out, _ = run_cli(["preflight", _site(tmp_path, images.parent)], capsys)
    assert code == 0, out
    assert _data_lines(out)[1] == (
        "NOTE    data.images: 3 PNG 16-bit gray images, values 0..4095 of full scale 0..65535: the values use under 1/8 "
        "of the full scale, so the model sees low-contrast images (each file is scaled by its format's full scale, not "
        "by its content) (fix: if these are 12-bit images in 16-bit files, store them scaled to 16 bits, or as DICOM "
        "with BitsStored 12)")


@pytest.mark.parametrize("second", ["png8", "dicom"])
def test_preflight_refuses_mixed_encodings_naming_a_file_of_each(tmp_path, capsys, second):
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(twelve_bit(i) * 16).save(images / f"{i}.png")
    if second == "png8":
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(odd := images / "z.png")
        other = "1 PNG 8-bit colour images, values 200..200 of full scale 0..255"
    else:
        write_dicom(odd := images / "z.dcm", twelve_bit(4), slope=1.0, intercept=-1024.0)
        other = "1 DICOM 12-bit gray images, values -1024..3071 of full scale -1024..3071"
    code, out, _ = run_cli(["preflight", _site(tmp_path, images.parent)], capsys)
    assert code == 1
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert problems == [
        "PROBLEM data.images: mixed encodings, the same intensity would reach the model as different values: "
        f"3 PNG 16-bit gray images, values 0..65520 of full scale 0..65535 (e.g. {images / '0.png'}); "
        f"{other} (e.g. {odd}) (fix: convert the images to one format and bit depth, or give each kind its own site or "
        "run)"]


def test_preflight_names_an_unreadable_file(tmp_path, capsys):
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    Image.fromarray(twelve_bit(0)).save(images / "0.png")
    bad = _multi_frame(images)
    code, out, _ = run_cli(["preflight", _site(tmp_path, images.parent)], capsys)
    assert code == 1
    assert [line for line in out.splitlines() if line.startswith("PROBLEM")] == [
        f"PROBLEM data.path: {bad} holds 3 frames: one image per file is read (fix: split it into one file per frame, "
        "or remove it)"]

