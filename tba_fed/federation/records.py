"""Flower ``ArrayRecord`` <-> the plain ``{name: ndarray}`` dicts of the wire format."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from .wire import Arrays


def to_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    return {k: v.numpy() for k, v in record.items()}
