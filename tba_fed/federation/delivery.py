"""A round's messages out to the sites and their replies back one at a time: bounded in time, across restarts.

Two things Flower 1.41 leaves to the app (measured on loopback: docs/deployment.md, "Restarts and reconnection"):

* Its HttpGrid retries a refused connection to the SuperLink without limit (``make_simple_http_retry_invoker``
  in ``flwr/supercore/retry/http_retry.py``: ``max_tries=None, max_time=None``), so while the SuperLink is
  down every Grid call blocks; under ``--isolation process`` the ServerApp outlives the SuperLink (under the
  default ``subprocess`` it dies with it, ``--parent-pid`` monitors). `BoundedGrid` gives every call a
  deadline: a SuperLink back in time (same ``--database``) lets the round carry on; one that is not, or that
  has marked the run finished meanwhile, ends the run with a FederationError that says so.
* A message is delivered to a SuperNode once. One that stops mid-round gets a ``NODE_UNAVAILABLE`` error reply,
  but only to a pull made while it is offline: one stopped and started again between two pulls has its message
  delivered and never answered. `replies_as_they_arrive` asks a site again once it is connected again (same
  key, same node id), until the round's deadline, whether it saw the error or only the site's new
  ``NodeInfo.last_activated_at`` (from ``Grid.get_nodes``; it changes only when a node comes online). A site's
  privacy ledger makes the repeat idempotent: a release it produced is re-sent as stored, one granted but never
  produced is produced once; nothing is noised or spent twice.
* A pull waits for a reply's parts to finish uploading, and a SuperNode that stops mid-upload leaves its reply
  half there: Flower's SuperLink releases it, as a ``MESSAGE_UNAVAILABLE`` error, only
  ``OBJECT_PUSH_SESSION_TTL_SECONDS`` (180 s) after its last part (``flwr/supercore/corestate``). So a pull
  is left to run while the SuperLink answers, a restarted site's request is dropped
  (before its pull, or during it), and a reply lost in upload is asked for again like one lost to a node
  that went offline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import httpx
from flwr.app import Message

from ..errors import FederationError
from ..logs import PROGRESS_SECONDS
from .flower_internals import OBJECT_PUSH_SESSION_TTL_SECONDS, ErrorCode, RunNotRunningException

_logger = logging.getLogger(__name__)

POLL_SECONDS = 3.0  # how often replies are pulled and an offline site is looked for (as Flower's send_and_receive pulls)
WAKE_SECONDS = 0.5  # longest uninterrupted wait of the main thread
LOST = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE)  # the SuperLink's replies for a request never answered


def progress_line(name: str, done: int, total: int, waiting: Sequence[str], seconds_left: float,
                  verb: str = "replied") -> str:
    """One line of a wait's progress, e.g. "statistics: 2/3 sites replied, waiting for hospital-c, 40 s left"."""
    line = f"{name}: {done}/{total} sites {verb}"
    return f"{line}, waiting for {', '.join(waiting)}, {max(seconds_left, 0.0):.0f} s left" if waiting else line


class RoundProgress:
    """The server's word while a round waits: a line when a site replies, and one at least every `every` seconds
    in between, naming the sites still awaited (by the names in `names`, which fill in as sites reply)."""

    def __init__(self, name: str, nodes: Sequence[int], names: Mapping[int, str], every: float = PROGRESS_SECONDS) -> None:
        self.name, self.nodes, self.names, self.every = name, list(nodes), names, every
        self.replied: set[int] = set()
        self.last = time.monotonic()

    def reply(self, node: int, seconds_left: float) -> None:
        self.replied.add(node)
        self._log(seconds_left)

    def wait(self, seconds_left: float) -> None:
        if time.monotonic() - self.last >= self.every:
            self._log(seconds_left)

    def _log(self, seconds_left: float) -> None:
        waiting = [self.names.get(node, f"node-{node}") for node in self.nodes if node not in self.replied]
        _logger.info("%s", progress_line(self.name, len(self.replied), len(self.nodes), waiting, seconds_left))
        self.last = time.monotonic()


class BoundedGrid:
    """A Grid whose calls to the SuperLink return within a deadline or raise FederationError. `patience`: how
    long one call may wait for an unreachable SuperLink (``send_and_receive`` gets its own timeout on top).
    ``pull_messages`` passes through: it also waits for a reply's parts still being uploaded, for as long as
    they take, so `replies_as_they_arrive` asks for the nodes (a bounded call) every POLL_SECONDS while it
    waits, and says what a Flower error from it means."""

    def __init__(self, grid: Any, patience: float) -> None:
        self._grid = grid
        self.patience = patience

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> list[int]:
        return list(self._bounded("get_node_ids", self.patience, self._grid.get_node_ids))

    def get_nodes(self) -> list[Any]:
        return list(self._bounded("get_nodes", self.patience, self._grid.get_nodes))

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        return list(self._bounded("push_messages", self.patience, self._grid.push_messages, list(messages)))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        limit = (timeout or 0.0) + self.patience
        return list(self._bounded("send_and_receive", limit, self._grid.send_and_receive, list(messages),
                                  timeout=timeout))

    def _bounded(self, what: str, limit: float, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`call` in a daemon thread (Flower's retry loop cannot be interrupted), waited for at most `limit`."""
        done, outcome = _in_thread(f"grid.{what}", call, *args, **kwargs)
        deadline = time.monotonic() + limit
        # short waits: a signal raised by another thread (Flower's parent-pid monitor raises SIGINT) is handled
        # only when this, the main thread, runs Python code again
        while not done.wait(min(WAKE_SECONDS, max(deadline - time.monotonic(), 0.0))) and time.monotonic() < deadline:
            pass
        if not done.is_set():
            raise FederationError(f"the SuperLink did not answer ({what}) within {limit:.0f} s: it is down or "
                                  "unreachable, so the run stops. Restart it with the same --database and submit "
                                  "the run again")
        if "error" in outcome:
            _raise(what, outcome["error"])
        return outcome["value"]


def _raise(what: str, error: BaseException) -> None:
    """Raise `error` from Flower's Grid, as a FederationError that says what to do when it is the SuperLink's."""
    if isinstance(error, RunNotRunningException):
        raise FederationError("the SuperLink no longer runs this run (stopped with `flwr stop`, or marked failed "
                              "because the ServerApp's heartbeat did not reach it): submit the run again") from None
    if isinstance(error, httpx.HTTPError):
        raise FederationError(f"the SuperLink refused {what}: {error}") from error
    raise error


def replies_as_they_arrive(grid: Any, messages: Sequence[Message], *, timeout: float,
                           progress: RoundProgress | None = None) -> Iterator[tuple[int, list[Message]]]:
    """Push one message per node, then yield ``(node, replies)`` as each node's reply reaches the SuperLink.

    Each reply is pulled on its own: Flower's ``send_and_receive`` returns only when the last reply is in, so
    the server held every site's reply at once (+126 MiB per site with 113 MB statistics replies,
    docs/benchmarks.md); here the caller judges and drops one before the next is pulled. `replies` holds
    several messages if the SuperLink returned several to one request, none if it did not accept the request.
    A node reported unavailable (offline, or its reply lost in upload), or online again since it was asked, is
    asked again with a copy of its message before the deadline (if it does not come back, its replies are that
    error). A reply that reached the SuperLink before the deadline is taken even if the caller's work on earlier
    ones ran past it. A node never yielded did not answer within `timeout`. `progress` hears of each node
    yielded and of the wait in between.
    """
    deadline = time.monotonic() + timeout
    asked = {message.metadata.dst_node_id: message for message in messages}
    activated = _activations(grid)
    pending = _push(grid, list(messages))
    def left() -> float:
        return deadline - time.monotonic()

    for node in set(asked) - set(pending.values()):
        _logger.warning("the SuperLink did not accept the message for node %s", node)
        if progress is not None:
            progress.reply(node, left())
        yield node, []
    offline: dict[int, Message] = {}  # node -> the SuperLink's "node unavailable" or "message unavailable" reply
    while pending or offline:
        expired = time.monotonic() >= deadline
        # before pulling: a restarted node's request went to its previous life, and a reply that life left
        # half-uploaded would hold the pull until the SuperLink gives up on it
        online = _activations(grid)
        restarted = {message_id: node for message_id, node in pending.items()
                     if _restarted(online, node, activated.get(node))}
        for message_id in restarted:
            del pending[message_id]
        back = [] if expired else sorted(set(offline) & set(online) | set(restarted.values()))
        if back:
            _logger.info("node(s) %s connected again: asking again", ", ".join(map(str, back)))
            for node in back:
                offline.pop(node, None)
                activated[node] = online[node]
            pending.update(_push(grid, [_copy(asked[node]) for node in back]))
        for message_id, node in list(pending.items()):
            replies = _pull_unless_restarted(grid, message_id, node, activated.get(node))
            if not replies:  # none in yet, or dropped: the next pass asks the restarted node again
                continue
            del pending[message_id]
            if len(replies) == 1 and replies[0].has_error() and replies[0].error.code in LOST:
                _logger.warning("node %s: its reply was lost (%s); it is asked again if it is connected in time",
                                node, "it went offline" if replies[0].error.code == ErrorCode.NODE_UNAVAILABLE
                                else "its upload did not complete")
                offline[node] = replies[0]
                continue
            if progress is not None:
                progress.reply(node, left())
            yield node, replies
            del replies  # the caller's copy is the only one left
        if expired:
            break
        if pending or offline:
            if progress is not None:
                progress.wait(left())
            time.sleep(min(POLL_SECONDS, max(left(), 0.0)))
    for node, error in offline.items():
        yield node, [error]


def _in_thread(name: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[threading.Event, dict[str, Any]]:
    """Start `call` in a daemon thread (Flower's Grid calls cannot be interrupted); the event is set when its
    outcome holds its "value" or its "error"."""
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = call(*args, **kwargs)
        except BaseException as err:  # noqa: B036 - RunNotRunningException is a BaseException
            outcome["error"] = err
        finally:
            done.set()

    threading.Thread(target=target, name=name, daemon=True).start()
    return done, outcome


def _pull_unless_restarted(grid: Any, message_id: str, node: int, since: str | None) -> list[Message]:
    """The replies the SuperLink has for `message_id`, or none if `node` comes online again (its activation
    time is no longer `since`) while the pull waits for its reply's parts: the life that was sending them is
    gone, and the SuperLink would hold the pull until the upload's push session expires. Asking for the nodes
    every POLL_SECONDS also ends the wait, with FederationError, if the SuperLink is gone."""
    done, outcome = _in_thread("grid.pull_messages", grid.pull_messages, [message_id])
    start = time.monotonic()
    look, say = start + POLL_SECONDS, start + PROGRESS_SECONDS
    while not done.wait(WAKE_SECONDS):
        now = time.monotonic()
        if now >= look:
            if _restarted(_activations(grid), node, since):  # asking is also the SuperLink's sign of life
                _logger.warning("node %s came online again while its reply was being received: that reply is "
                                "dropped", node)
                return []
            look = time.monotonic() + POLL_SECONDS
        if now >= say:
            _logger.info("node %s: its reply still being received after %.0f s (one whose site stopped mid-upload "
                         "is released by the SuperLink %d s after its last part)", node, now - start,
                         OBJECT_PUSH_SESSION_TTL_SECONDS)
            say = now + PROGRESS_SECONDS
    if "error" in outcome:
        _raise("pull_messages", outcome["error"])
    return list(outcome["value"])


def _push(grid: Any, messages: list[Message]) -> dict[str, int]:
    ids = list(grid.push_messages(messages))
    return {message_id: message.metadata.dst_node_id for message_id, message in zip(ids, messages, strict=False)
            if message_id}


def _activations(grid: Any) -> dict[int, str]:
    """Online node id -> when it last came online (the SuperLink changes it only when a node connects)."""
    return {int(node.node_id): node.last_activated_at for node in grid.get_nodes()}


def _restarted(online: Mapping[int, str], node: int, since: str | None) -> bool:
    """Whether `node`, online since `since` when it was asked, has come online again (offline counts as not yet)."""
    return since is not None and online.get(node, since) != since


def _copy(message: Message) -> Message:
    """The same request as a new message (Flower delivers a message id once)."""
    meta = message.metadata
    return Message(content=message.content, dst_node_id=meta.dst_node_id, message_type=meta.message_type,
                   group_id=meta.group_id or None)
