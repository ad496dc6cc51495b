"""What a running SuperLink itself reports, asked through Flower's own HTTP clients.

Flower 1.41 serves the Control and Fleet APIs on one TLS port. The Control API lists and registers
SuperNode keys (what ``flwr supernode list/register`` do); the Fleet API is where SuperNodes
register themselves when SuperNode authentication is off. The clients are Flower internals
(pinned by ``flwr>=1.41,<1.42``), so they are used only here.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import TBARunError
from .certificates import key_bytes

_logger = logging.getLogger(__name__)

REGISTRATION_DISABLED = 2001  # flwr ApiErrorCode.FLEET_SUPERNODE_REGISTRATION_DISABLED
SQLITE_HEADER = b"SQLite format 3\x00"


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


def _control(address: str, ca_certfile: Path):
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    with contextlib.redirect_stdout(io.StringIO()):  # Flower's CLI helper prints "Using SuperLink: ..."
        return init_http_client_from_connection(
            SuperLinkConnection(name="tba-fed", address=address, root_certificates=str(ca_certfile), insecure=False))


def registered_nodes(address: str, ca_certfile: Path) -> list[Node]:
    """SuperNodes the SuperLink knows (``flwr supernode list``), without unregistered ones."""
    from flwr.proto.control_pb2 import ListNodesRequest

    client = _control(address, ca_certfile)
    try:
        response = client.ListNodes(ListNodesRequest())
    except httpx.HTTPStatusError as err:
        raise _error(err) from None
    finally:
        client.close()
    return [Node(int(n.node_id), n.name, n.status, bytes(n.public_key)) for n in response.nodes_info
            if n.status != "unregistered"]


def register_node(address: str, ca_certfile: Path, public_key: ec.EllipticCurvePublicKey, name: str) -> int:
    """Register a site's public key (``flwr supernode register KEY.pub``); returns its node id."""
    from flwr.proto.control_pb2 import RegisterNodeRequest

    client = _control(address, ca_certfile)
    try:
        return int(client.RegisterNode(RegisterNodeRequest(public_key=key_bytes(public_key), name=name)).node_id)
    except httpx.HTTPStatusError as err:
        raise _error(err) from None
    finally:
        client.close()


def accepts_unregistered_nodes(address: str, ca_certfile: Path) -> bool:
    """Whether the SuperLink lets a SuperNode register itself, i.e. runs without SuperNode authentication.

    A throwaway key asks the Fleet API to register: with authentication on, the SuperLink refuses
    (Flower error 2001); without, it registers the key, which is unregistered again at once.
    """
    from flwr.proto.fleet_pb2 import RegisterNodeFleetRequest, UnregisterNodeFleetRequest
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    key = ec.generate_private_key(ec.SECP384R1())
    client = FleetHttpClient.from_server_address(address, False, Path(ca_certfile).read_bytes(),
                                                 [NodeAuthHttpInterceptor(key, key.public_key())])
    try:
        node_id = client.RegisterNode(RegisterNodeFleetRequest(public_key=key_bytes(key.public_key()))).node_id
    except httpx.HTTPStatusError as err:
        try:
            code = json.loads(err.response.content).get("code")
        except ValueError:
            code = None
        if code == REGISTRATION_DISABLED:
            return False
        raise _error(err) from None
    else:
        client.UnregisterNode(UnregisterNodeFleetRequest(node_id=node_id))
        _logger.warning("the SuperLink at %s registered an unknown SuperNode key: SuperNode authentication is off",
                        address)
        return True
    finally:
        client.close()


def database_node_ids(path: Path) -> set[int]:
    """Node ids stored in a SuperLink database file (read-only). Raises ValueError if the file is not
    a SuperLink database."""
    with open(path, "rb") as handle:
        if handle.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise ValueError("not an SQLite database")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = connection.execute("SELECT node_id FROM node").fetchall()
    except sqlite3.DatabaseError as err:
        raise ValueError(f"no SuperLink node table ({err})") from None
    finally:
        connection.close()
    return {int(n) % (1 << 64) for (n,) in rows}  # stored as signed 64-bit, reported unsigned
