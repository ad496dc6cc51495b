"""Noisy payloads a site has released, kept beside its ledger so a release asked again is re-sent.

A restarted site, or a message Flower delivers twice, must not draw fresh noise for a release it
already made: two noisy copies of the same sums spend the budget twice. The payload is stored
(atomically, before it is sent) and its sha256 goes into the ledger; a repeat sends those exact
bytes. The files hold only what the server received anyway (noisy aggregates), on the site's disk.
A stored payload that is missing or altered is an error, never a reason to re-noise.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import numpy as np

from ..errors import TBAInputError
from ..fileio import atomic_write, file_lock
from .ledger import unwritable

Arrays = dict[str, np.ndarray]


class ReleaseStore:
    def __init__(self, ledger: Path) -> None:
        self.folder = Path(ledger).with_name(Path(ledger).name + ".releases")

    def path(self, run_id: str, release: str) -> Path:
        run = hashlib.sha256(run_id.encode()).hexdigest()[:16]  # run ids are Flower's integers, or any text
        return self.folder / f"run-{run}.{release}.npz"

    def locked(self, run_id: str, release: str) -> contextlib.AbstractContextManager[None]:
        """Serialise one release across processes: a duplicate waits, then finds the stored payload."""
        return file_lock(self.path(run_id, release).with_suffix(".lock"), lambda err: unwritable(self.folder, err))

    def save(self, run_id: str, release: str, arrays: Arrays) -> str:
        """Store the payload (temporary file, fsync, rename); return the sha256 of the stored bytes."""
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = buffer.getvalue()
        atomic_write(self.path(run_id, release), lambda tmp: tmp.write_bytes(data), durable=True)
        return hashlib.sha256(data).hexdigest()

    def load(self, run_id: str, release: str, sha256: str) -> Arrays:
        """The stored payload, checked against the sha256 the ledger recorded."""
        target = self.path(run_id, release)
        fix = "the release cannot be re-sent without spending budget again; the server must start a new run"
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            raise TBAInputError("privacy.ledger", f"run {run_id} made its {release!r} release but {target} is gone",
                                fix) from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise TBAInputError("privacy.ledger", f"{target} does not match the sha256 recorded in the ledger", fix)
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            return {key: stored[key] for key in stored.files}
