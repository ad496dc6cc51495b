"""Image files read with their real bit depth, so no intensity is clipped on the way to the model.

8-bit images (PNG, JPEG, TIFF, BMP, ...) are read as they always were: a Pillow RGB image for timm's transform.
Deeper ones become float tensors [3, H, W] in [0, 1], each image scaled by the range its own file declares
(never by what other images hold, so one image's preprocessing does not depend on which others exist):

- 16-bit PNG and TIFF, gray or colour: by the container's full scale, 65535. A 12-bit image stored in 16 bits
  (values up to 4095) therefore reaches at most 4095/65535 ≈ 0.06; preflight reports the values found against
  the full scale.
- DICOM (``.dcm``/``.dicom``, through pydicom): RescaleSlope/RescaleIntercept applied, then scaled by the range
  BitsStored and PixelRepresentation allow, mapped through the same rescale (for CT, e.g. -1024..3071 HU). A
  window (WindowCenter/WindowWidth) is a display choice that clips, so it is not used. MONOCHROME1 is inverted.

16-bit colour (and gray with alpha) is decoded by imagecodecs (PNG) or tifffile (TIFF): Pillow keeps only its
high 8 bits. Alpha is dropped, as Pillow's RGB conversion drops it for 8-bit images.

Refused, one line naming the file: undecodable files, several frames or pages in one file, 32-bit, signed and
floating-point pixels (no defined full scale), DICOM without pixel data, with a palette or a modality LUT, or
compressed with a transfer syntax no installed decoder reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import TBAInputError

DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (*IMG_EXTENSIONS, *DICOM_SUFFIXES)
_SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I;16N")
_DICOM_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422")  # pydicom's pixel_array converts YBR to RGB
REPLACE = "remove or replace the file"


@dataclass(frozen=True)
class ImageInfo:
    """What preflight reports of one image: its format, depth, channels, the values found and the range that
    maps to [0, 1] (in the file's units: stored values, or DICOM's modality units such as HU)."""

    format: str
    bits: int
    channels: int
    low: float
    high: float
    full_scale: tuple[float, float]

    @property
    def encoding(self) -> tuple[str, tuple[float, float]]:
        """Images share an encoding when the same value means the same model input: DICOM (modality units)
        apart from display images, and the range mapped to [0, 1] the same. Gray and colour may mix."""
        return ("DICOM" if self.format == "DICOM" else "image", self.full_scale)

    @property
    def kind(self) -> str:
        return f"{self.format} {self.bits}-bit {'gray' if self.channels == 1 else 'colour'}"


def read_image(path: str) -> Image.Image | torch.Tensor:
    """The loader of image folders: an 8-bit image as a Pillow RGB image, a deeper one as floats in [0, 1]."""
    return decode(path, measure=False)[0]


def decode(path: str, *, measure: bool = True) -> tuple[Image.Image | torch.Tensor, ImageInfo]:
    """The image's pixels for the model's transform, and what was found; any decoding failure names the file.
    Without `measure`, an 8-bit image's values are not scanned (low and high are NaN): the loader's fast path."""
    try:
        if Path(path).suffix.lower() in DICOM_SUFFIXES:
            return _dicom(path)
        with Image.open(path) as image:
            return _raster(path, image, measure)
    except TBAInputError:  # a ValueError too: already names the file
        raise
    except (OSError, ValueError, EOFError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TBAInputError("data.path", f"{path} cannot be read as an image ({reason})", REPLACE) from None


def _refuse(path: str, why: str, fix: str) -> TBAInputError:
    return TBAInputError("data.path", f"{path} {why}", fix)


def _single(path: str, count: int, what: str) -> None:
    if count > 1:
        raise _refuse(path, f"holds {count} {what}: one image per file is read",
                      f"split it into one file per {what[:-1]}, or remove it")


def _raster(path: str, image: Image.Image, measure: bool) -> tuple[Image.Image | torch.Tensor, ImageInfo]:
    fmt = image.format or Path(path).suffix.lstrip(".").upper()
    _single(path, getattr(image, "n_frames", 1), "pages" if fmt == "TIFF" else "frames")
    deep = image.mode in ("RGB", "RGBA", "LA") and any(";16" in str(tile.args) for tile in image.tile)
    if image.mode in _SIXTEEN_BIT_GRAY:
        pixels = np.asarray(image).astype(np.float32)
    elif deep:  # 16-bit colour, or gray with alpha: Pillow would keep only the high 8 bits
        pixels = _sixteen_bit(path, fmt)
    elif image.mode in ("I", "F") or image.mode.startswith("I;"):
        raise _refuse(path, f"has {image.mode} pixels (32-bit or floating point, or signed): no full scale to map to "
                            "[0, 1]", "save it as 8- or 16-bit unsigned integers")
    else:  # 8-bit: exactly what timm's transform always received
        rgb = image.convert("RGB")
        extrema = rgb.getextrema() if measure else ((float("nan"), float("nan")),)
        info = ImageInfo(fmt, 8, 1 if image.mode in ("1", "L", "LA") else 3, min(e[0] for e in extrema),
                         max(e[1] for e in extrema), (0.0, 255.0))
        return rgb, info
    info = ImageInfo(fmt, 16, 1 if pixels.ndim == 2 else 3, float(pixels.min()), float(pixels.max()), (0.0, 65535.0))
    return _tensor(pixels / 65535.0), info


def _sixteen_bit(path: str, fmt: str) -> np.ndarray:
    """A 16-bit image Pillow cannot hold (colour, or gray with alpha) as floats [H, W] or [H, W, 3], alpha
    dropped as Pillow's RGB conversion drops it: PNG through imagecodecs (libpng), TIFF through tifffile."""
    import imagecodecs
    import tifffile

    if fmt not in ("PNG", "TIFF"):
        raise _refuse(path, f"is a 16-bit colour {fmt}, read only as PNG or TIFF", "save it as a 16-bit PNG or TIFF")
    try:
        pixels = tifffile.imread(path) if fmt == "TIFF" else imagecodecs.png_decode(Path(path).read_bytes())
    except (ValueError, RuntimeError, NotImplementedError, KeyError) as err:  # e.g. a TIFF compression without codec
        raise _refuse(path, f"is a 16-bit {fmt} that cannot be decoded ({str(err).splitlines()[0]})",
                      "save it uncompressed or deflate-compressed") from None
    if pixels.dtype != np.uint16 or pixels.ndim not in (2, 3):
        raise _refuse(path, f"decodes to {pixels.dtype} pixels of shape {pixels.shape}, not a 16-bit image",
                      "save it as 8- or 16-bit gray or RGB")
    if pixels.ndim == 3:
        pixels = pixels[..., 0] if pixels.shape[-1] == 2 else pixels[..., :3]
    return pixels.astype(np.float32)


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    """[H, W] or [H, W, 3] floats as a [3, H, W] tensor (grayscale repeated, as Pillow's RGB conversion does)."""
    image = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    return image.expand(3, *image.shape) if image.ndim == 2 else image.permute(2, 0, 1)


def _dicom(path: str) -> tuple[torch.Tensor, ImageInfo]:
    import pydicom  # imported on first use: most runs read no DICOM
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise _refuse(path, f"is not a DICOM file ({err})", REPLACE) from None
    _single(path, int(ds.get("NumberOfFrames") or 1), "frames")
    if "PixelData" not in ds:
        raise _refuse(path, "is a DICOM file without pixel data (no image)", REPLACE)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2", *_DICOM_COLOUR):
        raise _refuse(path, f"has photometric interpretation {photometric or 'none'}: only MONOCHROME1, MONOCHROME2 and "
                            "RGB/YBR_FULL are read", "export it as grayscale or RGB")
    if "ModalityLUTSequence" in ds:
        raise _refuse(path, "has a modality LUT (only RescaleSlope/RescaleIntercept are applied)",
                      "export it with a linear rescale")
    if (missing := [k for k in ("BitsStored", "Rows", "Columns") if k not in ds]):
        raise _refuse(path, f"is a DICOM file without {', '.join(missing)}", REPLACE)
    try:
        stored = ds.pixel_array
    except (NotImplementedError, RuntimeError) as err:  # pydicom: no installed plugin decodes this transfer syntax
        syntax = ds.file_meta.get("TransferSyntaxUID")
        lines = str(err).splitlines()  # pydicom: one line, then one per plugin: "\tname - requires packages"
        plugins = "; ".join(line.split(" requires ", 1)[-1].strip() for line in lines[1:])
        raise _refuse(path, f"is compressed ({getattr(syntax, 'name', syntax)}) and no installed decoder reads it",
                      f"export it uncompressed, or install one of: {plugins}" if plugins else
                      f"export it uncompressed ({lines[0] if lines else type(err).__name__})") from None
    bits = int(ds.BitsStored)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        lo, hi = sorted((slope * lo + intercept, slope * hi + intercept))
    else:
        values = np.asarray(stored, dtype=np.float64)
    scaled = (values - lo) / (hi - lo)
    if photometric == "MONOCHROME1":  # the smallest value is white
        scaled = 1.0 - scaled
    info = ImageInfo("DICOM", bits, 1 if scaled.ndim == 2 else 3, float(values.min()), float(values.max()),
                     (float(lo), float(hi)))
    return _tensor(scaled), info
