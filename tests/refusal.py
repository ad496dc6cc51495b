"""What every bad-input case asserts: the error names the field (and the fix), nothing was written or
left half-written where it could have been, and no process or file descriptor leaked."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tba_fed.cli import main
from tba_fed.errors import TBAInputError


def snapshot(root: Path) -> dict[str, bytes | None] | None:
    """Every file (bytes) and directory (None) under `root`, hidden temporary files included; None if absent."""
    root = Path(root)
    if not root.exists():
        return None
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def child_pids() -> set[int]:
    """Live processes whose parent is this one (read from /proc; psutil is not a dependency)."""
    me, children = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:  # field 4, after the parenthesised command name
                children.add(int(entry))
    return children


@contextlib.contextmanager
def unchanged(untouched: Sequence[Path] = (), *, fds: bool = True) -> Iterator[None]:
    """Every path in `untouched` byte-identical afterwards (or still absent); no more open file descriptors
    (unless `fds` is False) and the same child processes as before."""
    before = {path: snapshot(path) for path in untouched}
    fd_count, children = open_fds(), child_pids()
    yield
    for path, state in before.items():
        assert snapshot(path) == state, f"{path} changed"
    if fds:  # fewer is fine: the CLI's logging.basicConfig(force=True) closes handlers other code opened
        assert open_fds() <= fd_count, "file descriptors leaked"
    assert child_pids() == children, "child processes leaked"


@contextlib.contextmanager
def refused(field: str, *, fix: str | None = None, error: type[Exception] = TBAInputError,
            untouched: Sequence[Path] = (), fds: bool = True) -> Iterator[pytest.ExceptionInfo]:
    """The block must raise `error` (a TBAInputError) whose field is exactly `field` and, given, whose fix is
    exactly `fix`, leaving `untouched` as it was and leaking nothing (see `unchanged`)."""
    with unchanged(untouched, fds=fds), pytest.raises(error) as info:
        yield info
    assert isinstance(info.value, TBAInputError) and info.value.field == field, (info.value, field)
    if fix is not None:
        assert info.value.fix == fix, (info.value.fix, fix)


def run_cli(argv: list[str], capsys, untouched: Sequence[Path] = ()) -> tuple[int, str, str]:
    """Run tba-fed's entry point in this process: its exit code (argparse's SystemExit too), stdout and stderr;
    `untouched` must not change and nothing may leak (see `unchanged`)."""
    capsys.readouterr()
    with unchanged(untouched):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
