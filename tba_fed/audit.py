"""A tamper-evident audit log: JSON Lines, each entry chained to the previous one by its sha256.

Entry ``k`` holds ``seq`` (= k), ``time`` (UTC), ``prev`` (the hash of entry k-1, 64 zeros for the first),
``nonce`` (128 random bits, fresh for each entry), the event's own fields, and ``hash``: the sha256 of the
canonical JSON (sorted keys, no spaces) of the entry without ``hash``. The nonce salts the hash: a head
travels to a counterpart who knows nearly every field of the entry (a site's image count may be the only
one it lacks) and could otherwise find the rest by hashing every candidate. Entries written before the
nonce have none, and still verify. Editing an entry breaks its hash; removing or reordering entries breaks the
``seq``/``prev`` links. What the chain alone cannot show is the loss of its *last* entries, or a
whole chain rewritten consistently: for that a verifier needs an anchor, a head (the hash of the latest
entry) recorded elsewhere at some earlier time (``check_chain(..., head=...)``, and the federation's
cross-check of site and server logs).

Appends are serialised by an exclusive ``flock`` on a sibling ``.lock`` file and written as one
``write`` of the whole line, then fsynced: a crash can leave only a torn final line (no newline), which
``check_chain`` reports apart from tampering. ``append`` fails closed: it refuses to extend a log that
does not verify. An `AuditLog` reads and checks the whole log once; after that an append re-hashes the
bytes it verified, without parsing them, and checks only the entries added since.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import load_json
from .errors import TBAInputError
from .fileio import file_lock, fsync_path
from .privacy.ledger import now

_logger = logging.getLogger(__name__)

GENESIS = "0" * 64
_CHUNK = 1 << 20  # bytes read at a time when re-hashing a verified prefix
REQUIRED = ("seq", "time", "prev", "hash")  # in every entry (those written before the nonce lack only it)
RESERVED = (*REQUIRED, "nonce")  # set by the log, never by an event


class AuditLogInvalid(TBAInputError):
    """The log does not verify (tampered or torn): nothing is appended to it."""


def canonical(value: Any) -> bytes:
    """The bytes every hash is taken over: JSON with sorted keys, no spaces, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def entry_hash(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a log: where (file, 1-based line, the entry's seq if readable) and what."""

    path: Path
    line: int | None
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = str(self.path) + (f":{self.line}" if self.line is not None else "")
        return where + (f" (seq {self.seq})" if self.seq is not None else "") + f": {self.message}"


@dataclass
class AuditCheck:
    """A log as read and checked: its entries (with their line numbers) and every problem found."""

    path: Path
    entries: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    torn: bool = False

    @property
    def head(self) -> str:
        """The hash of the last entry (GENESIS for an empty log): what a counterpart records as an anchor."""
        return str(self.entries[-1]["hash"]) if self.entries else GENESIS

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        """What a report states of the log: where, how many entries, the head, whether and why it does not verify."""
        return {"path": str(self.path), "entries": len(self.entries), "head": self.head, "ok": self.ok,
                "problems": [str(p) for p in self.problems]}


def check_chain(path: Path, *, head: str | None = None) -> AuditCheck:
    """Read `path` and check every link; `head` (a hash recorded earlier) must be one of its entries.

    Problems are collected, not raised, so a verifier sees all of them; after a gap the check
    resynchronises on the entry found, so one removed or edited entry is reported once, two swapped
    entries twice.
    """
    path = Path(path)
    fix = "give the path of an audit log (audit.jsonl)"
    if path.is_dir():
        raise TBAInputError("audit", f"{path} is a directory", fix)
    if not path.is_file():
        raise TBAInputError("audit", f"{path} does not exist", fix)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TBAInputError("audit", f"{path} cannot be read ({err.strerror or err})", fix) from None
    return _check_bytes(path, data, head=head)


@dataclass(frozen=True)
class _Verified:
    """What a process verified of a log: its first `size` bytes (sha256 `digest`) hold `entries` entries
    ending at `head`, every link checked."""

    size: int
    digest: bytes
    entries: int
    head: str


def _check_bytes(path: Path, data: bytes, *, head: str | None = None, after: _Verified | None = None) -> AuditCheck:
    """`check_chain` of `data`, the bytes of the log at `path`, or with `after` the bytes that follow that
    verified prefix: then its first entry must continue the prefix's chain, and lines and sizes count on."""
    complete = data.rfind(b"\n") + 1  # everything after the last newline is an interrupted append
    check = AuditCheck(path, torn=complete < len(data))
    lines, size, expected_seq, expected_prev = (0, 0, 0, GENESIS) if after is None else (
        after.entries, after.size, after.entries, after.head)
    for number, raw in enumerate(data[:complete].splitlines(), start=lines + 1):
        def problem(message: str, seq: int | None = None, line: int = number) -> None:
            check.problems.append(Problem(path, line, seq, message))
        try:
            entry = load_json(raw)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's parser goes
            problem("not a JSON entry (edited or corrupted)")
            continue
        if not isinstance(entry, dict) or any(k not in entry for k in REQUIRED) or not isinstance(entry["seq"], int):
            problem(f"not an audit entry (needs {', '.join(REQUIRED)})")
            continue
        seq, linked = entry["seq"], bool(check.entries) or after is not None
        if entry["hash"] != entry_hash(entry):
            problem("hash mismatch: the entry was edited after it was written", seq)
        if not linked and (seq != 0 or entry["prev"] != GENESIS):
            problem(f"bad first entry: seq {seq} and prev {str(entry['prev'])[:12]}…, expected seq 0 and prev "
                    "0000… (entries before it were removed)", seq)
        elif linked and seq != expected_seq:
            gap = seq - expected_seq
            what = (f"{gap} entr{'y' if gap == 1 else 'ies'} missing before it (removed) or entries reordered"
                    if gap > 0 else "entries reordered or duplicated")
            problem(f"seq {seq} where {expected_seq} was expected: {what}", seq)
        elif linked and entry["prev"] != expected_prev:
            problem("prev does not match the previous entry's hash: an entry was replaced or the chain "
                    "rewritten from here", seq)
        check.entries.append(entry)
        check.lines.append(number)
        if seq >= expected_seq:  # an entry from further back (reordered) leaves the expected link where it was
            expected_seq, expected_prev = seq + 1, entry["hash"]
    if check.torn:
        check.problems.append(Problem(
            path, lines + data[:complete].count(b"\n") + 1, None,
            f"torn final line: {len(data) - complete} bytes without a newline, the remains of an interrupted "
            f"append (a crash, not tampering). After checking it, cut it off with: truncate -s {size + complete} {path}"))
    if head is not None and head not in {e["hash"] for e in check.entries}:
        check.problems.append(Problem(path, None, None, f"head {head[:12]}… is not in the log: it was truncated "
                                                        "or rewritten after that head was recorded"))
    return check


def chained(seq: int, prev: str, event: Mapping[str, Any]) -> tuple[str, bytes]:
    """Entry `seq` holding `event`, linked to `prev` and salted with a fresh nonce: its hash and its line as
    written (seq, time, prev, nonce, event, hash)."""
    entry = {"seq": seq, "time": now(), "prev": prev, "nonce": secrets.token_hex(16), **event}
    entry["hash"] = entry_hash(entry)
    return entry["hash"], json.dumps(entry, allow_nan=False).encode() + b"\n"


def locked(path: Path) -> contextlib.AbstractContextManager[None]:
    """The writers' lock of the log at `path`: an exclusive ``flock`` on its sibling ``.lock`` file."""
    return file_lock(path.with_name(path.name + ".lock"))


def _tail(path: Path, known: _Verified, digest: hashlib._Hash) -> bytes | None:
    """What follows the verified prefix, if the file still begins with exactly its bytes (their sha256 fed to
    `digest`, at disk speed, no parsing), else None."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return b"" if known.size == 0 else None
    with handle:
        buffer = memoryview(bytearray(_CHUNK))
        remaining = known.size
        while remaining:
            read = handle.readinto(buffer[:min(remaining, _CHUNK)])
            if not read:
                return None  # shorter than what was verified
            digest.update(buffer[:read])
            remaining -= read
        return handle.read() if digest.digest() == known.digest else None


class AuditLog:
    """Appends events to the hash-chained log at `path` (created on first use).

    The first check reads and verifies the whole log; the object then remembers what it verified (bytes,
    their sha256, entries, head). A later append, under the lock, re-hashes only those bytes to confirm they
    are unchanged (a same-length edit changes the hash), verifies the entries other writers added since, and
    appends. Anything else (the prefix changed, shrank or is gone, a new entry does not link) falls back to the
    full check, anchored at the remembered head, which names the problem and refuses; so a log cut back
    past an entry this object verified is refused too, which the chain alone would not show.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._known: _Verified | None = None

    def verified(self) -> AuditCheck:
        """The whole log checked (empty if it does not exist yet); raises `AuditLogInvalid` if it does not verify."""
        with locked(self.path):
            return self._check_whole()[0]

    def _check_whole(self) -> tuple[AuditCheck, _Verified, hashlib._Hash]:
        """Under the lock: read and check every entry; return the check, what it verified and a sha256 of it."""
        data = self.path.read_bytes() if self.path.exists() else b""
        known = self._known
        check = _check_bytes(self.path, data, head=known.head if known is not None and known.entries else None)
        if check.problems:
            raise AuditLogInvalid("audit", f"{self.path} does not verify ({check.problems[0]}); refusing to "
                                           "append to it", f"run `tba-fed audit verify {self.path}`")
        digest = hashlib.sha256(data)
        self._known = _Verified(len(data), digest.digest(), len(check.entries), check.head)
        return check, self._known, digest

    def _current(self) -> tuple[_Verified, hashlib._Hash]:
        """Under the lock: the whole log as it is now, verified, and a sha256 of its bytes to extend."""
        known = self._known
        if known is not None:
            digest = hashlib.sha256()
            tail = _tail(self.path, known, digest)
            if tail is not None and (added := _check_bytes(self.path, tail, after=known)).ok:
                digest.update(tail)
                self._known = _Verified(known.size + len(tail), digest.digest(), known.entries + len(added.entries),
                                        added.entries[-1]["hash"] if added.entries else known.head)
                return self._known, digest
        _, whole, digest = self._check_whole()  # raises, naming the problem
        if known is not None:
            _logger.warning("audit %s: the %d bytes verified earlier changed, yet every entry verified then is "
                            "intact (entries re-serialised)", self.path, known.size)
        return whole, digest

    def append(self, event: Mapping[str, Any]) -> str:
        """Chain `event` onto the log and return the new head; refuses if the log does not verify."""
        if clash := [k for k in RESERVED if k in event]:
            raise ValueError(f"event fields {clash} are reserved by the audit log")
        with locked(self.path):
            created = not self.path.exists()
            known, digest = self._current()
            head, line = chained(known.entries, known.head, event)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(f"short write to {self.path}: the log now ends in a torn line")
                os.fsync(fd)
            finally:
                os.close(fd)
            digest.update(line)
            self._known = _Verified(known.size + len(line), digest.digest(), known.entries + 1, head)
            if created:
                fsync_path(self.path.parent)
        _logger.debug("audit %s: entry %d (%s)", self.path, known.entries, head[:12])
        return head
