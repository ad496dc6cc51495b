"""Atomic outputs: a result directory appears whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import TBAInputError


def cache_dir() -> Path:
    """Where downloaded and converted assets and crash reports live: ``$TBA_FED_CACHE`` or ``~/.cache/tba-fed``
    (never the repo)."""
    env = os.environ.get("TBA_FED_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tba-fed"


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
