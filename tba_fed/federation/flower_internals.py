"""Every use tba-fed (and its tests) makes of Flower beyond Flower's public API, in one place.

Checked against flwr 1.42.0 (``FLOWER_CHECKED``): each item was read off that release's source, is unchanged
from 1.41.0 (the two wheels differ in 22 files, none of them below), and is exercised by the tests named with
it. Public here means exported by ``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``, ``flwr.common``,
``flwr.server`` (``.strategy``, ``.workflow``) or ``flwr.client.mod``, and the ``flwr``/``flower-*`` commands
with their ``--format json`` output. Nothing below is, so any Flower release may change it: before widening
the flwr pin in pyproject.toml, re-read each item against the new source and run the named tests.

Why each is needed (Flower 1.42 offers no public way):

- SecAgg+ (tests/test_secure_aggregation.py): ``secaggplus_mod`` keeps the round's participants and threshold
  only in its own state record, which a site reads to judge the round it contributes to (:func:`secagg_round`);
  the mod speaks legacy FitIns/FitRes inside Message-API messages, converted with Flower's unexported
  ``recorddict_compat``; and :class:`SecAggPlusWorkflowFixed` fixes a dropout bug by overriding two stages of
  ``SecAggPlusWorkflow`` and editing its ``WorkflowState``.
- Reply errors (tests/test_delivery.py, test_restarts.py): ``Error.code`` is public, the ``ErrorCode`` values
  are not; a Grid raises ``RunNotRunningException`` once the SuperLink stopped the run. A SuperNode restarted
  between two pulls is seen only by its ``NodeInfo.last_activated_at`` (from the public ``Grid.get_nodes``;
  the field's meaning, set only when a node comes online, is read off ``sql_linkstate.activate_node``).
  A reply whose SuperNode stopped mid-upload holds a pull until its push session expires,
  ``OBJECT_PUSH_SESSION_TTL_SECONDS`` after its last part (``corestate.store_object``/``get_object``), and
  then comes as a ``MESSAGE_UNAVAILABLE`` error (``HttpGrid.pull_messages``).
- SuperNode keys (tests/test_preflight.py, test_deployment.py): the byte form the SuperLink stores and lists
  keys in, and the curves it accepts.
- Flower's config file (tests/test_submit.py): where ``flwr`` reads connections, and its default content.
- The Control API (tests/test_deployment.py, test_preflight.py, test_site_kit.py): ``flwr supernode list
  --format json`` gives no public keys, and tba-fed matches sites to nodes by key, so ``ListNodes``/
  ``RegisterNode`` are called through the client ``flwr`` itself uses; ``tba-fed status`` lists runs with
  ``ListRuns`` the same way, since ``flwr ls`` needs a connection written in the operator's config file.
- SuperNode authentication (tests/test_profile.py, test_preflight.py): neither the Control API nor ``flwr``
  reports whether a SuperLink authenticates SuperNodes; only the Fleet API's answer to a self-registration
  shows it (:func:`accepts_self_registration`).
- The SuperLink database (tests/test_preflight.py): nothing public names the file a running SuperLink keeps
  its state in; its ``node`` table is read, read-only (:func:`database_node_ids`).
- Tests only: the identity a ServerApp process has (``TaskIdentity``, needed to build Messages outside a
  run), the wire form of a Message, ``NodeInfo`` (what ``Grid.get_nodes`` returns), ``ClientAppException``,
  ``flwr``'s reader of its config file, and a Fleet API client with a chosen key pair and the requests it
  sends (tests/intruder_client.py, a SuperNode that lies about its key).
"""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Context, Message, RecordDict
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.clientapp.client_app import ClientAppException
from flwr.common import FitIns, FitRes
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.compat.common import recorddict_compat
from flwr.proto.fleet_pb2 import (ActivateNodeRequest, PullMessagesRequest, RegisterNodeFleetRequest,
                                  UnregisterNodeFleetRequest)
from flwr.proto.node_pb2 import Node as FleetNode
from flwr.proto.node_pb2 import NodeInfo
from flwr.server import LegacyContext
from flwr.server.client_proxy import ClientProxy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.supercore.constant import OBJECT_PUSH_SESSION_TTL_SECONDS
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve
from flwr.supercore.run import RunNotRunningException
from flwr.supercore.task_identity import TaskIdentity

FLOWER_CHECKED = "1.42.0"

__all__ = ["ActivateNodeRequest", "ClientAppException", "ClientProxy", "ErrorCode", "FleetNode", "NodeInfo",  # re-exported
           "OBJECT_PUSH_SESSION_TTL_SECONDS", "PullMessagesRequest", "RunNotRunningException", "public_key_to_bytes",
           "uses_nist_ec_curve"]

SQLITE_HEADER = b"SQLite format 3\x00"

# ------------------------------------------------------------------------------------------------- SecAgg+


def secagg_round(context: Context) -> tuple[tuple[int, ...], int] | None:
    """(node ids whose public keys this site received at set-up, reconstruction threshold) of the SecAgg+ round
    in progress, from the state ``secaggplus_mod`` keeps in the node's Context; None outside a set-up round."""
    record = context.state.config_records.get(RECORD_KEY_STATE)
    if record is None:
        return None
    state = SecAggPlusState(**record)
    if not state.public_keys_dict or state.threshold < 1:
        return None
    return tuple(sorted(int(nid) for nid in state.public_keys_dict)), int(state.threshold)


def fitins_from_content(content: RecordDict) -> FitIns:
    """The legacy FitIns ``secaggplus_mod`` hands the handler at the masked-vector stage."""
    return recorddict_compat.recorddict_to_fitins(content, keep_input=True)


def fitres_content(fitres: FitRes) -> RecordDict:
    """A legacy FitRes as the reply content ``secaggplus_mod`` masks."""
    return recorddict_compat.fitres_to_recorddict(fitres, keep_input=False)


class SecAggPlusWorkflowFixed(SecAggPlusWorkflow):
    """Flower's SecAggPlusWorkflow with one bookkeeping fix: a site that drops out before its key shares are
    distributed (setup or share-keys stage) stays in ``sampled_node_ids``, so the unmask stage calls it dead
    and asks the others for its key share, which they never received (KeyError in ``secaggplus_mod._unmask``:
    one silent site sinks the round). No site masks with such a site (masks are built only with the sites whose
    shares arrived), so it is forgotten: removed from the sampled sites and from every neighbourhood, and the
    threshold is rechecked on the sites that remain. Relies on the stage methods, ``_check_threshold`` and the
    ``WorkflowState`` fields of flwr 1.42.0."""

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._forget_dropped(super().setup_stage(grid, context, state), state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._forget_dropped(super().share_keys_stage(grid, context, state), state)

    def _forget_dropped(self, passed: bool, state: WorkflowState) -> bool:
        if not state.nid_to_neighbours:  # the stage stopped before the protocol was set up
            return passed
        kept = set(state.active_node_ids)
        state.sampled_node_ids = kept
        state.nid_to_neighbours = {nid: neighbours & kept for nid, neighbours in state.nid_to_neighbours.items()
                                   if nid in kept}
        return len(kept) >= 2 and self._check_threshold(state)


# -------------------------------------------------------------------------------------- Flower's config file


def flower_config_path() -> Path:
    """Flower's config.toml, found as ``flwr`` finds it (FLWR_HOME, else ~/.flwr)."""
    from flwr.cli.constant import FLOWER_CONFIG_FILE
    from flwr.supercore.utils import get_flwr_home

    return get_flwr_home() / FLOWER_CONFIG_FILE


def default_flower_config() -> str:
    """What ``flwr`` writes to a config.toml that does not exist yet."""
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    return DEFAULT_FLOWER_CONFIG_TOML


# ---------------------------------------------------------------------------------------- the SuperLink's APIs


def _control(address: str, ca_certfile: Path) -> Any:
    """Flower's Control API client (``with`` closes it), built as ``flwr`` builds it for a TLS connection."""
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    with contextlib.redirect_stdout(io.StringIO()):  # Flower's CLI helper prints "Using SuperLink: ..."
        return init_http_client_from_connection(
            SuperLinkConnection(name="tba-fed", address=address, root_certificates=str(ca_certfile), insecure=False))


def control_list_nodes(address: str, ca_certfile: Path) -> list[Any]:
    """The Control API's ``ListNodes`` (what ``flwr supernode list`` shows, public keys included): NodeInfo
    messages with ``node_id``, ``name``, ``status`` and ``public_key``. Raises ``httpx.HTTPStatusError``."""
    from flwr.proto.control_pb2 import ListNodesRequest

    with _control(address, ca_certfile) as client:
        return list(client.ListNodes(ListNodesRequest()).nodes_info)


def control_register_node(address: str, ca_certfile: Path, public_key: ec.EllipticCurvePublicKey, name: str) -> int:
    """The Control API's ``RegisterNode`` (``flwr supernode register KEY.pub --name NAME``); the new node id."""
    from flwr.proto.control_pb2 import RegisterNodeRequest

    with _control(address, ca_certfile) as client:
        return int(client.RegisterNode(RegisterNodeRequest(public_key=public_key_to_bytes(public_key), name=name)).node_id)


def control_list_runs(address: str, ca_certfile: Path) -> list[Any]:
    """The Control API's ``ListRuns`` (what ``flwr ls`` shows, without needing a named connection in the
    operator's config file): Run messages with ``run_id``, ``status.status``/``sub_status``/``details`` and
    ``pending_at``. Raises ``httpx.HTTPStatusError``."""
    from flwr.proto.control_pb2 import ListRunsRequest

    with _control(address, ca_certfile) as client:
        return list(client.ListRuns(ListRunsRequest()).run_dict.values())


def fleet_client(address: str, ca_certfile: Path, private_key: ec.EllipticCurvePrivateKey,
                 public_key: ec.EllipticCurvePublicKey) -> Any:
    """Flower's Fleet API client as ``flower-supernode`` builds it, signing every call with `private_key`
    and presenting `public_key` (a SuperNode passes its own pair; tests/intruder_client.py does not)."""
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    return FleetHttpClient.from_server_address(
        address, False, Path(ca_certfile).read_bytes(),
        [RuntimeVersionHttpInterceptor(component_name="SuperNode"), NodeAuthHttpInterceptor(private_key, public_key)])


def accepts_self_registration(address: str, ca_certfile: Path) -> bool:
    """Whether the SuperLink lets a SuperNode register itself through the Fleet API, i.e. runs without
    SuperNode authentication. A fresh key asks to register: with authentication on the SuperLink refuses
    (``FLEET_SUPERNODE_REGISTRATION_DISABLED``) and stores nothing; without, it registers the key, which is
    unregistered again at once (it stays listed as "unregistered", on a SuperLink that is then refused).
    Raises ``httpx.HTTPStatusError`` for any other answer."""
    from flwr.supercore.error import ApiErrorCode

    key = ec.generate_private_key(ec.SECP384R1())
    with fleet_client(address, ca_certfile, key, key.public_key()) as client:
        try:
            node_id = client.RegisterNode(RegisterNodeFleetRequest(public_key=public_key_to_bytes(key.public_key())))
        except httpx.HTTPStatusError as err:
            try:
                code = json.loads(err.response.content).get("code")
            except ValueError:
                code = None
            if code == ApiErrorCode.FLEET_SUPERNODE_REGISTRATION_DISABLED:
                return False
            raise
        client.UnregisterNode(UnregisterNodeFleetRequest(node_id=node_id.node_id))
        return True


def database_node_ids(path: Path) -> set[int]:
    """Node ids stored in a SuperLink database file, read-only (table ``node``, column ``node_id``, a signed
    64-bit integer the APIs report unsigned: ``flwr/supercore/state/schema/linkstate_models.py``). Raises
    ValueError if the file is not a SuperLink database."""
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
    return {int(n) % (1 << 64) for (n,) in rows}


# ------------------------------------------------------------------------------------------------ tests only


@contextlib.contextmanager
def serverapp_identity(run_id: int) -> Iterator[None]:
    """Give this process the identity a running ServerApp has (task 1, node 0, `run_id`), as flwr-serverapp
    sets it: ``Message(...)`` stamps it on every message, and outside a run there is none."""
    saved = {name: vars(TaskIdentity).get(f"_{name}") for name in ("run_id", "task_id", "node_id")}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 0
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


def read_flower_connection(name: str) -> Any:
    """The connection ``flwr run . NAME`` would use, read by ``flwr``'s own reader of its config file."""
    from flwr.cli.flower_config import read_superlink_connection

    return read_superlink_connection(name)


def wire_copy(msg: Message) -> Message:
    """What the other side receives: the message serialised and parsed again as Flower does on the wire."""
    return message_from_proto(message_to_proto(msg))
