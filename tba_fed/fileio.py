"""Files: atomic outputs (a result directory appears whole or not at all), and tensor files read with
errors that name them."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import TBAInputError

MARKER = "manifest.yaml"


def check_output_dir(path: Path, *, overwrite: bool, marker: str = MARKER) -> None:
    """Refuse to clobber anything that is not a previous tba-fed output, and anything without --overwrite."""
    if not path.exists():
        return
    if not path.is_dir():
        raise TBAInputError("output", f"{path} exists and is not a directory", "choose another output path")
    if not any(path.iterdir()):
        return
    if not overwrite:
        raise TBAInputError("output", f"{path} already exists", "pass --overwrite (overwrite: true) or choose another path")
    if not (path / marker).is_file():
        raise TBAInputError("output", f"{path} is not empty and holds no {marker}; refusing to replace it",
                            "choose an empty or new output path")


@contextlib.contextmanager
def atomic_directory(path: Path, *, overwrite: bool = False, marker: str = MARKER) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    check_output_dir(path, overwrite=overwrite, marker=marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_input_file(path: Path, field: str, fix: str) -> None:
    """`path` must be an existing regular file: a missing one or a directory is named as such."""
    if path.is_dir():
        raise TBAInputError(field, f"{path} is a directory, not a file", fix)
    if not path.is_file():
        raise TBAInputError(field, f"{path} does not exist", fix)


def read_safetensors(path: Path, field: str, fix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing, truncated or foreign file is a TBAInputError naming it
    (the format holds raw tensors only, so nothing in it can run code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_input_file(path, field, fix)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise TBAInputError(field, f"{path} is not a readable safetensors file ({err})", fix) from None
