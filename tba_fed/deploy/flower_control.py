"""What a running SuperLink itself reports: its Control API (what ``flwr supernode list/register`` call) and
its Fleet API (where SuperNodes register themselves when SuperNode authentication is off). Flower's clients for
both are not public: they are called in :mod:`tba_fed.federation.flower_internals`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import TBARunError
from ..federation.flower_internals import (accepts_self_registration, control_list_nodes, control_list_runs,
                                          control_register_node)

_logger = logging.getLogger(__name__)


class SuperLinkAPIError(TBARunError):
    """The SuperLink answered a request with an error (its code and detail in the message)."""


@dataclass(frozen=True)
class Node:
    node_id: int
    name: str
    status: str
    public_key: bytes


def _error(err: httpx.HTTPStatusError) -> SuperLinkAPIError:
    try:
        body = json.loads(err.response.content)
        return SuperLinkAPIError(f"HTTP {err.response.status_code}, Flower error {body.get('code')}: {body.get('detail')}")
    except ValueError:
        return SuperLinkAPIError(f"HTTP {err.response.status_code}")


def registered_nodes(address: str, ca_certfile: Path) -> list[Node]:
    """SuperNodes the SuperLink knows (``flwr supernode list``), without unregistered ones."""
    try:
        nodes = control_list_nodes(address, ca_certfile)
    except httpx.HTTPStatusError as err:
        raise _error(err) from None
    return [Node(int(n.node_id), n.name, n.status, bytes(n.public_key)) for n in nodes if n.status != "unregistered"]


@dataclass(frozen=True)
class Run:
    run_id: int
    status: str        # as flwr ls shows it: pending, starting, running, finished:completed|failed|stopped
    details: str
    pending_at: str    # when it was submitted (ISO time, as the SuperLink reports it)


def runs(address: str, ca_certfile: Path) -> list[Run]:
    """Every run the SuperLink knows (``flwr ls``), oldest first."""
    try:
        found = control_list_runs(address, ca_certfile)
    except httpx.HTTPStatusError as err:
        raise _error(err) from None
    listed = [Run(int(r.run_id), ":".join(p for p in (r.status.status, r.status.sub_status) if p), r.status.details,
                  r.pending_at) for r in found]
    return sorted(listed, key=lambda run: (run.pending_at, run.run_id))


def register_node(address: str, ca_certfile: Path, public_key: ec.EllipticCurvePublicKey, name: str) -> int:
    """Register a site's public key (``flwr supernode register KEY.pub``); returns its node id."""
    try:
        return control_register_node(address, ca_certfile, public_key, name)
    except httpx.HTTPStatusError as err:
        raise _error(err) from None


def accepts_unregistered_nodes(address: str, ca_certfile: Path) -> bool:
    """Whether the SuperLink lets a SuperNode register itself, i.e. runs without SuperNode authentication
    (no public API says so: see ``flower_internals.accepts_self_registration``)."""
    try:
        open_registration = accepts_self_registration(address, ca_certfile)
    except httpx.HTTPStatusError as err:
        raise _error(err) from None
    if open_registration:
        _logger.warning("the SuperLink at %s registered an unknown SuperNode key: SuperNode authentication is off",
                        address)
    return open_registration

