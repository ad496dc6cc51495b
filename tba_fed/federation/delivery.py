"""A round's messages out to the sites and their replies back: bounded in time, across restarts.

Two things Flower 1.41 leaves to the app (measured on loopback: docs/deployment.md, "Restarts and
reconnection"):

* Its HttpGrid retries a refused connection to the SuperLink without limit (``make_simple_http_retry_invoker``
  in ``flwr/supercore/retry/http_retry.py``: ``max_tries=None, max_time=None``), so while the SuperLink is
  down every Grid call blocks. Under the SuperLink's default ``--isolation subprocess`` the ServerApp dies
  with the SuperLink anyway (``--parent-pid`` monitors), but under ``--isolation process`` it outlives it.
  `BoundedGrid` gives every call a deadline: a SuperLink back in time (same ``--database``) lets the round
  carry on; one that is not, or that has marked the run finished meanwhile, ends the run with a
  FederationError that says so.
* A SuperNode that stops mid-round is reported by the SuperLink as an error reply (``NODE_UNAVAILABLE``)
  to the message it held, and that message is never delivered again. `send_and_receive` asks such a
  site again, once it is connected again (same key, same node id), until the round's deadline. A site's
  privacy ledger makes the repeat idempotent: a release it produced is re-sent as stored, one granted but
  never produced is produced once; nothing is noised or spent twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import httpx
from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.supercore.run import RunNotRunningException

from ..errors import FederationError

_logger = logging.getLogger(__name__)

POLL_SECONDS = 3.0  # how often a site that went offline is looked for (Flower's own interval between pulls)
WAKE_SECONDS = 0.5  # longest uninterrupted wait of the main thread


class BoundedGrid:
    """A Grid whose calls to the SuperLink return within a deadline or raise FederationError.

    `patience`: how long one call may wait for an unreachable SuperLink (``send_and_receive`` gets its
    own timeout on top). Calls that do not reach the SuperLink (``run``, ``set_run``, ...) pass through.
    """

    def __init__(self, grid: Any, patience: float) -> None:
        self._grid = grid
        self.patience = patience

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> list[int]:
        return list(self._bounded("get_node_ids", self.patience, self._grid.get_node_ids))

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        return list(self._bounded("push_messages", self.patience, self._grid.push_messages, list(messages)))

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return list(self._bounded("pull_messages", self.patience, self._grid.pull_messages, list(message_ids)))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        limit = (timeout or 0.0) + self.patience
        return list(self._bounded("send_and_receive", limit, self._grid.send_and_receive, list(messages),
                                  timeout=timeout))

    def _bounded(self, what: str, limit: float, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`call` in a daemon thread (Flower's retry loop cannot be interrupted), waited for at most `limit`."""
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def target() -> None:
            try:
                outcome["value"] = call(*args, **kwargs)
            except BaseException as err:  # noqa: B036 - RunNotRunningException is a BaseException
                outcome["error"] = err
            finally:
                done.set()

        threading.Thread(target=target, name=f"grid.{what}", daemon=True).start()
        deadline = time.monotonic() + limit
        # short waits: a signal raised by another thread (Flower's parent-pid monitor raises SIGINT) is handled
        # only when this, the main thread, runs Python code again
        while not done.wait(min(WAKE_SECONDS, max(deadline - time.monotonic(), 0.0))) and time.monotonic() < deadline:
            pass
        if not done.is_set():
            raise FederationError(f"the SuperLink did not answer ({what}) within {limit:.0f} s: it is down or "
                                  "unreachable, so the run stops. Restart it with the same --database and submit "
                                  "the run again")
        error = outcome.get("error")
        if isinstance(error, RunNotRunningException):
            raise FederationError("the SuperLink no longer runs this run (stopped with `flwr stop`, or marked failed "
                                  "because the ServerApp's heartbeat did not reach it): submit the run again") from None
        if isinstance(error, httpx.HTTPError):
            raise FederationError(f"the SuperLink refused {what}: {error}") from error
        if error is not None:
            raise error
        return outcome["value"]


def send_and_receive(grid: Any, messages: Sequence[Message], *,
                     timeout: float) -> tuple[dict[int, Message], Counter[int]]:
    """Send one message per node; collect replies until they are all in or `timeout` passes.

    Returns the replies keyed by the node asked (an error the SuperLink generates comes from the
    SuperLink's own node id, so such replies are matched to the message they answer), and how many
    replies each node sent (more than one to one request: the caller discards them all). A node reported
    unavailable is asked again, with a copy of its message, once it is connected again before the
    deadline; if it is not, its entry is that error reply. A node missing from the result did not answer.
    """
    deadline = time.monotonic() + timeout
    asked = {message.metadata.dst_node_id: message for message in messages}
    replies: dict[int, Message] = {}
    counts: Counter[int] = Counter()
    batch = list(messages)
    while True:
        received = grid.send_and_receive(batch, timeout=max(deadline - time.monotonic(), 0.0))
        offline = _collect(received, batch, replies, counts)
        back: list[int] = []
        while offline and not back and deadline - time.monotonic() > POLL_SECONDS:
            time.sleep(POLL_SECONDS)
            back = sorted(offline & set(grid.get_node_ids()))
        if not back:
            return replies, counts
        _logger.info("node(s) %s connected again: asking again", ", ".join(map(str, back)))
        batch = [_copy(asked[node]) for node in back]


def _collect(received: Iterable[Message], sent: Sequence[Message], replies: dict[int, Message],
             counts: Counter[int]) -> set[int]:
    """File `received` under the node each answers for and count them (a node's offline error, then its
    answer to the repeated request, count once); return the nodes the SuperLink reported unavailable."""
    nodes = {message.metadata.dst_node_id for message in sent}
    by_id = {message.metadata.message_id: message.metadata.dst_node_id for message in sent}
    offline = set()
    for reply in received:
        node = reply.metadata.src_node_id
        if node not in nodes:
            node = by_id.get(reply.metadata.reply_to_message_id)
        if node is None:
            continue
        replies[node] = reply
        if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
            _logger.warning("node %s went offline during the round; it is asked again if it reconnects in time", node)
            offline.add(node)
        else:
            counts[node] += 1
    return offline


def _copy(message: Message) -> Message:
    """The same request as a new message (Flower delivers a message id once)."""
    meta = message.metadata
    return Message(content=message.content, dst_node_id=meta.dst_node_id, message_type=meta.message_type,
                   group_id=meta.group_id or None)
