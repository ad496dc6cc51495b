"""One message round: send a request to every site, judge each reply as it arrives, keep the valid ones.

A reply counts only if it echoes this round's stamp (`envelope`), is not a failure reply (`failures`) and
passes the round's own check; a site that errors, times out or sends a bad reply is excluded and named in
the round's `RoundLog`. A round with fewer than ``min_sites`` valid replies stops the run with a message
naming every site and its reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from ..errors import FederationError, TBAInputError, one_line
from ..logs import PROGRESS_SECONDS
from .delivery import RoundProgress, progress_line, replies_as_they_arrive
from .envelope import check_echo, stamp
from .failures import decode_failure, error_reason
from .records import from_record, received_schema
from .server_audit import ServerAudit, reply_receipt
from .wire import payload_bytes

_logger = logging.getLogger(__name__)


@dataclass
class RoundLog:
    """One round's outcome per site; `nodes` are the sites whose replies were valid (asked next round);
    `names` maps node ids to the sites' names (`Rounds.names`), shared by all rounds of a run."""

    name: str
    names: dict[int, str]
    seconds: float = 0.0
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: list[int] = field(default_factory=list)


def record_bytes(content: RecordDict) -> int:
    """Array payload of a message (what the statistics cost on the wire, before framing)."""
    return sum(payload_bytes(from_record(record)) for record in content.array_records.values())


def _site_name(node_id: int, reply: Message | None, names: dict[int, str]) -> str:
    """A site's own name once it has sent one (remembered in `names` for later rounds), else the name it is
    registered under, else its node id."""
    if reply is not None and not reply.has_error() and "meta" in reply.content.config_records:
        claimed = str(reply.content.config_records["meta"].get("site", node_id))
        if claimed not in (name for other, name in names.items() if other != node_id):  # a taken name is refused
            names[node_id] = claimed
    return names.get(node_id, f"node-{node_id}")


def exchange(grid: Grid, nodes: list[int], message_type: str, make_content: Callable[[], RecordDict],
             accept: Callable[[RecordDict], Any], log: RoundLog, *, timeout: float, min_sites: int,
             images: Callable[[Any], int] | None = None, audit: ServerAudit | None = None) -> dict[str, Any]:
    """Send one message per node, judge each reply with `accept` as it arrives (it decodes and checks the reply,
    raising if it is not valid), keep what it returns for the valid ones.

    Replies are judged one at a time and dropped, so `accept` may add a reply to a running sum
    (`releases.RunningSum`) and the server holds one site's reply at a time. `images` reads the image count a
    valid reply summarises, for the report; `audit` records the round.
    """
    start = time.perf_counter()
    contents = {node: make_content() for node in nodes}
    sent = {node: Message(content=contents[node], dst_node_id=node, message_type=message_type) for node in nodes}
    for msg in sent.values():
        stamp(msg, log.name)
    accepted: dict[str, Any] = {}
    entries: dict[int, dict[str, Any]] = {}
    receipts: dict[int, dict[str, Any]] = {}
    progress = RoundProgress(log.name, nodes, log.names)
    for node, replies in replies_as_they_arrive(grid, list(sent.values()), timeout=timeout, progress=progress):
        reply = replies[0] if len(replies) == 1 else None
        name = _site_name(node, replies[-1] if replies else None, log.names)
        entry: dict[str, Any] = {"node_id": node}
        if len(replies) > 1:
            entry.update(status="rejected", reason=f"duplicate reply: {len(replies)} replies to one request, all discarded")
        elif reply is None:
            entry.update(status="not delivered", reason="the SuperLink did not accept the request")
        elif reply.has_error():
            entry.update(status="error", reason=error_reason(reply.error))
        else:
            if audit is not None:
                receipts[node] = reply_receipt(reply)
            try:
                check_echo(reply.content, sent[node], name)
                failure = decode_failure(reply.content)
                if failure is not None:  # the site could not serve the request, and says why in one line
                    entry.update(status=failure[0], reason=failure[1])
                else:
                    accepted[name] = accept(reply.content)
                    entry.update(status="ok", bytes_received=record_bytes(reply.content),
                                 received=received_schema(reply.content))
                    if images is not None:
                        entry["images"] = images(accepted[name])
            except (TBAInputError, KeyError, ValueError) as err:
                entry.update(status="rejected", reason=one_line(str(err)))
        entries[node] = entry
        del replies, reply  # one site's reply held at a time
    for node in nodes:  # the report lists sites in node order, whatever order their replies came in
        entry = entries.get(node) or {"node_id": node, "status": "no reply", "reason": f"no reply within {timeout:.0f} s"}
        name = _site_name(node, None, log.names)
        if entry["status"] != "ok":
            _logger.warning("round %s: excluded %s: %s", log.name, name, entry["reason"])
        log.sites[name] = {"node_id": node, "bytes_sent": record_bytes(contents[node]),
                           **{k: v for k, v in entry.items() if k != "node_id"}}
    log.seconds = time.perf_counter() - start
    log.nodes = [log.sites[name]["node_id"] for name in log.sites if log.sites[name]["status"] == "ok"]
    if audit is not None:
        audit.round(log.name, log.sites, message_type, contents, receipts)
    if len(accepted) < min_sites:
        detail = "; ".join(f"{one_line(s, 100)}: {v['status']}" + (f" ({v['reason']})" if v.get("reason") else "")
                           for s, v in log.sites.items())
        raise FederationError(f"round {log.name}: {len(accepted)} valid replies, min_sites is {min_sites}. {detail}")
    return accepted


def wait_for_nodes(grid: Grid, wanted: int, minimum: int, timeout: float) -> list[int]:
    """Wait until `wanted` sites are connected, or settle for `minimum` when the timeout passes."""
    deadline = time.monotonic() + timeout
    said: tuple[int, float] = (-1, time.monotonic())  # connected sites when the last progress line was logged, and when
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or (time.monotonic() > deadline and len(nodes) >= minimum):
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} sites connected within {timeout:.0f} s; min_sites is {minimum}")
        if len(nodes) != said[0] or time.monotonic() - said[1] >= PROGRESS_SECONDS:
            _logger.info("%s", progress_line("waiting for sites", len(nodes), wanted, [], 0, "connected")
                         + f", {deadline - time.monotonic():.0f} s left (min_sites {minimum})")
            said = (len(nodes), time.monotonic())
        time.sleep(1.0)


def registered_names(grid: Grid, nodes: list[int]) -> dict[int, str]:
    """The names the SuperLink holds for `nodes` (`tba-fed superlink` registers each site's key under its name in
    the run YAML), so a round names a site it waits for before that site has replied; none in a simulation. A site's
    reply may name it otherwise, but never by another site's name (`_site_name`)."""
    wanted = set(nodes)
    return {int(node.node_id): str(node.name) for node in grid.get_nodes() if node.node_id in wanted and node.name}


class Rounds:
    """A run's rounds in order: the sites still taking part (those whose last reply was valid), their names
    (registered at the SuperLink, or given in their replies; shared by every round) and each round's log."""

    def __init__(self, grid: Grid, nodes: list[int], *, timeout: float, min_sites: int, audit: ServerAudit) -> None:
        self.grid, self.nodes, self.timeout, self.min_sites, self.audit = grid, nodes, timeout, min_sites, audit
        self.connected = len(nodes)
        self.names = registered_names(grid, nodes)
        self.logs: list[RoundLog] = []

    def start(self, name: str) -> RoundLog:
        self.logs.append(RoundLog(name, self.names))
        return self.logs[-1]

    def ask(self, name: str, message_type: str, make_content: Callable[[], RecordDict],
            accept: Callable[[RecordDict], Any], images: Callable[[Any], int] | None = None) -> dict[str, Any]:
        """One `exchange` with the sites still taking part; those whose replies were valid take part next."""
        log = self.start(name)
        accepted = exchange(self.grid, self.nodes, message_type, make_content, accept, log, timeout=self.timeout,
                            min_sites=self.min_sites, images=images, audit=self.audit)
        self.nodes = log.nodes
        return accepted

    def report(self) -> list[dict[str, Any]]:
        return [{"name": r.name, "seconds": round(r.seconds, 3), "sites": r.sites} for r in self.logs]
