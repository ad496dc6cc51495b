"""Output directories: written atomically, recognised only by the marker tba-fed writes in them, and never
replaced, emptied or written into when they hold anything tba-fed did not write there.

The marker, ``tba-fed-output.json``, names the kind of output (``format: tba-fed/<kind>/1``) and lists every
file tba-fed wrote with its sha256 (or null for a file tba-fed appends to and whose reader checks it line by
line, the experiment's ``rows.jsonl``). A file that is not listed, is not a regular file, or no longer has its
recorded sha256 is someone else's: the directory is then refused, never replaced.

Tensor files are read with errors that name them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .config import SHA256_HEX, load_json
from .errors import TBAInputError

if TYPE_CHECKING:  # a type in a signature: reading a file needs no torch until it loads tensors
    import torch

_logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where downloaded and converted assets and crash reports live: ``$TBA_FED_CACHE`` or ``~/.cache/tba-fed``
    (never the repo)."""
    env = os.environ.get("TBA_FED_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tba-fed"


MARKER = "tba-fed-output.json"
KINDS = {"compressed": "a compressed model", "similarity": "a similarity analysis", "experiment": "an experiment",
         "export": "an exported model"}
_SHA256 = re.compile(SHA256_HEX)
NEW_PATH = "choose an empty or new output path"


def output_format(kind: str) -> str:
    return f"tba-fed/{kind}/1"


def writable_location(path: Path, field: str) -> Path:
    """The nearest existing directory at or above `path`, once a file was created and removed in it: files can
    be written at `path`. A probe, not the permission bits (they lie to root). Refused, naming `field`, under a
    file or where this user cannot write."""
    existing = target = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(existing))
        fd, probe = tempfile.mkstemp(prefix=".tba-fed-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise TBAInputError(field, f"{target} is not writable ({err.strerror}: {existing})",
                            "give a directory this user can create files in") from None
    return existing


def _read_marker(path: Path, kind: str) -> dict[str, str | None]:
    """The files the marker in the non-empty directory `path` lists, if it is tba-fed's marker of `kind`."""
    marker = path / MARKER
    if not marker.exists() and not marker.is_symlink():
        raise TBAInputError("output", f"{path} is not empty and holds no {MARKER}, so it is not a tba-fed output; "
                                      "refusing to touch it", NEW_PATH)

    def unreadable(why: str) -> TBAInputError:
        return TBAInputError("output", f"{marker} is not a tba-fed marker ({why}); refusing to touch {path}", NEW_PATH)

    if not stat.S_ISREG(marker.lstat().st_mode):
        raise unreadable("not a regular file")
    try:
        data = load_json(marker.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise unreadable(f"{type(err).__name__}: {err}"[:200]) from None
    found = data.get("format") if isinstance(data, dict) else None
    if not isinstance(found, str):
        raise unreadable("no format")
    if found != output_format(kind):
        other = next((k for k in KINDS if found == output_format(k)), None)
        if other is None:
            raise unreadable(f"format {found[:80]!r}; this tba-fed writes {output_format(kind)!r}")
        raise TBAInputError("output", f"{path} holds {KINDS[other]} written by tba-fed, not {KINDS[kind]}; refusing to "
                                      "touch it", "choose another output path, or move that output away first")
    files = data.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(name, str) and name and name not in (MARKER, ".", "..") and "/" not in name and "\0" not in name
            and (digest is None or (isinstance(digest, str) and _SHA256.match(digest)))
            for name, digest in files.items()):
        raise unreadable("files must map the names of the files in the directory to their sha256")
    return files


def _leftover(name: str, files: Mapping[str, str | None]) -> bool:
    """A temporary file of atomic_write_text left by an interrupted write of a listed file or of the marker."""
    return any(name.startswith(f".{listed}.") and len(name) == len(listed) + 10 for listed in (*files, MARKER))


def owned_files(path: Path, kind: str) -> dict[str, str | None]:
    """The files tba-fed wrote in the output directory `path` of `kind`, as its marker lists them; {} when `path`
    is absent or empty. Refused: a directory without tba-fed's marker of this kind, or holding anything the
    marker does not list, anything but regular files, or a listed file changed since tba-fed wrote it."""
    path = Path(path)
    if not path.exists():
        return {}
    if not path.is_dir():
        raise TBAInputError("output", f"{path} exists and is not a directory", "choose another output path")
    entries = sorted(os.listdir(path))
    if not entries:
        return {}
    files = _read_marker(path, kind)
    if foreign := [name for name in entries if name != MARKER and name not in files and not _leftover(name, files)]:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise TBAInputError("output", f"{path} holds {shown}, which tba-fed did not write there; refusing to touch it",
                            "move them out, or choose another output path")
    for name in entries:
        entry = path / name
        if not stat.S_ISREG(entry.lstat().st_mode):
            raise TBAInputError("output", f"{entry} is not a regular file, so tba-fed did not write it; refusing to "
                                          f"touch {path}", "move it out, or choose another output path")
        if files.get(name) is not None and file_sha256(entry) != files[name]:
            raise TBAInputError("output", f"{entry} was changed since tba-fed wrote it (its sha256 differs from the "
                                          f"one in {MARKER}); refusing to replace it",
                                "move it out to keep it, or choose another output path")
    return files


def check_output_dir(path: Path, *, kind: str, overwrite: bool) -> dict[str, str | None]:
    """Before any work: an output of `kind` can be written at `path` (new, empty, or, with overwrite, tba-fed's
    own earlier output of that kind) by this user. Returns the files of the output it will replace."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise TBAInputError("output", f"{path} already exists", "pass --overwrite (overwrite: true) or choose another path")
    files = owned_files(path, kind)
    writable_location(path.parent, "output")
    if path.is_dir():  # the earlier output's files are deleted from it
        writable_location(path, "output")
    return files


def write_marker(folder: Path, kind: str, files: Mapping[str, str | None]) -> None:
    atomic_write_text(folder / MARKER, json.dumps({"format": output_format(kind), "tba_fed_version": __version__,
                                                   "files": dict(sorted(files.items()))}, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(path: Path, *, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory to write an output of `kind` in; on success it takes the place of
    `path` with a marker listing its files, on error it is removed. An earlier output is replaced only if it is
    tba-fed's own (checked again at the end: the work may take long), and only its files are deleted."""
    path = Path(path)
    check_output_dir(path, kind=kind, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        write_marker(tmp, kind, {p.name: file_sha256(p) for p in sorted(tmp.iterdir())})
        _put_in_place(tmp, path, check_output_dir(path, kind=kind, overwrite=overwrite))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _put_in_place(tmp: Path, path: Path, earlier: Mapping[str, str | None]) -> None:
    """Rename `tmp` to `path`; an earlier output there is moved aside first, then its own files are deleted."""
    if not path.exists():
        os.replace(tmp, path)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    old = aside / path.name
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        aside.rmdir()
        raise
    for name in os.listdir(old):
        if name == MARKER or name in earlier or _leftover(name, earlier):
            os.unlink(old / name)
    try:
        old.rmdir()
        aside.rmdir()
    except OSError:
        _logger.warning("%s: files that appeared in the earlier output while the new one was written were kept in %s",
                        path, old)


def open_output_dir(path: Path, kind: str, appended: Iterable[str] = ()) -> dict[str, str | None]:
    """Before any work: create `path` as an output of `kind` that tba-fed writes in place (an experiment that
    resumes), or reopen tba-fed's own; refused like owned_files, or if this user cannot write there.
    `appended`: files tba-fed appends to, listed without a sha256. Returns the marker's files (update them
    with write_owned)."""
    path = Path(path)
    files = owned_files(path, kind)
    writable_location(path, "output")
    path.mkdir(parents=True, exist_ok=True)
    files |= {name: None for name in appended}
    write_marker(path, kind, files)
    return files


def write_owned(folder: Path, kind: str, files: dict[str, str | None], texts: Mapping[str, str | bytes]) -> None:
    """Write each text (or bytes: an image) atomically into `folder`, then record it and its sha256 in the marker
    (`files` updated)."""
    for name, text in texts.items():
        if isinstance(text, bytes):
            atomic_write(folder / name, lambda tmp, data=text: tmp.write_bytes(data))
        else:
            atomic_write_text(folder / name, text)
        files[name] = file_sha256(folder / name)
    write_marker(folder, kind, files)


def atomic_write(path: Path, write: Callable[[Path], object], *, mode: int | None = None, durable: bool = False,
                 unwritable: Callable[[OSError], Exception] | None = None, exclusive: bool = False) -> None:
    """Write `path` whole or not at all: `write` fills a temporary sibling, renamed into place.

    `mode`: the file's permissions, set before anything is written (mkstemp makes 0600). `durable`: fsync the
    file before the rename and the folder after, so the rename survives a crash (the privacy records).
    `unwritable`: the error to raise if the temporary file cannot be created (else the OSError itself).
    `exclusive`: never replace an existing `path` (FileExistsError), even one created meanwhile: the temporary
    file is hard-linked into place, which fails if the name is taken (keys, files a person may have written)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        if unwritable is None:
            raise
        raise unwritable(err) from None
    os.close(fd)
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        write(Path(tmp))
        if durable:
            fsync_path(tmp)
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_path(path.parent)


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder by its path (a folder's, so a rename or a new entry in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def file_lock(path: Path, unwritable: Callable[[OSError], Exception] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the lock file `path` (created, with its folder) for the block: serialises
    writers across processes. `unwritable`: the error to raise if the lock file cannot be created."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path, "w")  # noqa: SIM115 - closed below
    except OSError as err:
        if unwritable is None:
            raise
        raise unwritable(err) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


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
