"""Flower ``ArrayRecord`` <-> the plain ``{name: ndarray}`` dicts of the wire format."""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from ..audit import canonical
from .wire import Arrays, payload_sha256


def to_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    return {k: v.numpy() for k, v in record.items()}


def received_schema(content: RecordDict) -> dict[str, list[int]]:
    """Names and shapes of every array a message carried: what the report shows the server received."""
    return {f"{name}:{key}": list(np.shape(value)) for name, record in content.array_records.items()
            for key, value in from_record(record).items()}


def content_sha256(content: RecordDict) -> str:
    """sha256 of a message's content as both ends see it: each array record's payload hash, each config and
    metric record's values, but not a reply's ``meta`` (it carries the site's audit head, itself a hash of an
    entry holding this hash)."""
    def plain(value):
        return value.hex() if isinstance(value, bytes) else [plain(v) for v in value] if isinstance(value, list) else value

    parts = {"arrays": {name: payload_sha256(from_record(record)) for name, record in content.array_records.items()},
             "configs": {name: {k: plain(v) for k, v in record.items()}
                         for name, record in content.config_records.items() if name != "meta"},
             "metrics": {name: dict(record.items()) for name, record in content.metric_records.items()}}
    return hashlib.sha256(canonical(parts)).hexdigest()
