"""Which images a run uses and which it holds out: a decision about each image alone.

Record-level differential privacy protects one image: adding or removing it may change nothing but
its own contribution. So whether an image is used at all (``sample_rate``) and whether it is held
out (``holdout_fraction``) is decided from a keyed hash (HMAC-SHA256) of that image's own bytes,
compared with fixed thresholds; never from its position among the others, never from how many
there are. A deployed site keys the hash with a secret it generated once and keeps in its state
directory (`privacy.site_state`), so nobody else can predict or steer the decisions. Simulations,
tests and centralised runs key it from the data seed (`development_key`): they are reproducible,
and a simulated federation selects exactly the images a centralised run on the union selects.
Identical images (the same bytes) get the same decision; they are still two records.

There is no privacy amplification by subsampling here: the key is fixed, so every release of a
site uses the same images, and nothing is claimed for ``sample_rate < 1``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from typing import Literal, Protocol

import numpy as np
from tqdm.auto import tqdm

from .errors import TBAInputError

_logger = logging.getLogger(__name__)

KEY_BYTES = 32
_DOMAIN = b"tba-fed/image-decision/1\x00"  # keeps these hashes apart from any other use of the key
_UNIT = float(2**64)
Decision = Literal["calibration", "holdout"] | None


class Records(Protocol):
    """A data source whose images can be read as bytes: what a per-image decision is a function of."""

    def __len__(self) -> int: ...

    def record(self, index: int) -> bytes: ...


def development_key(seed: int) -> bytes:
    """The key of runs that need reproducibility, not secrecy: simulations, tests, centralised runs."""
    return hashlib.sha256(f"tba-fed development split key/{int(seed)}".encode()).digest()


def check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise TBAInputError("state", f"the split key must be {KEY_BYTES} bytes", "run tba-fed site init DIR")
    return key


def decide(record: bytes, key: bytes, *, sample_rate: float, holdout_fraction: float) -> Decision:
    """One image's fate from its bytes alone: unused (None), calibration or held out.

    Two independent uniforms in [0, 1) are read off the HMAC: the first against `sample_rate`,
    the second against `holdout_fraction`.
    """
    digest = hmac.new(key, _DOMAIN + record, hashlib.sha256).digest()
    if int.from_bytes(digest[:8], "big") / _UNIT >= sample_rate:
        return None
    return "holdout" if int.from_bytes(digest[8:16], "big") / _UNIT < holdout_fraction else "calibration"


def split_indices(dataset: Records, indices: Iterable[int], key: bytes, *, sample_rate: float,
                  holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, held-out) positions among `indices` of `dataset`, each decided from its own bytes."""
    check_key(key)
    if not hasattr(dataset, "record"):
        raise TBAInputError("data.source", f"{type(dataset).__name__} cannot read its images as bytes, so no "
                                           "per-image decision can be made", "use one of tba-fed's data sources")
    indices = list(indices)
    fates: dict[Decision, list[int]] = {"calibration": [], "holdout": [], None: []}
    for index in tqdm(indices, desc="selecting", unit="image", leave=False, disable=None):
        fate = decide(dataset.record(int(index)), key, sample_rate=sample_rate, holdout_fraction=holdout_fraction)
        fates[fate].append(int(index))
    calibration, holdout = fates["calibration"], fates["holdout"]
    _logger.info("selected %d calibration and %d held-out images of %d (sample rate %g, held-out fraction %g)",
                 len(calibration), len(holdout), len(indices), sample_rate, holdout_fraction)
    return np.asarray(calibration, dtype=np.int64), np.asarray(holdout, dtype=np.int64)
