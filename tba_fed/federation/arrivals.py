"""Replies one at a time, as the sites send them, so the server can validate and drop each in turn.

``Grid.send_and_receive`` returns only when every reply is in, so the ServerApp held every site's reply,
then every decoded copy, before adding the first: with 113 MB statistics replies its peak grew by 269 MiB
per site (benchmarks/scale_deployment.py, docs/benchmarks.md). Here the messages are pushed together and
each reply is pulled on its own as soon as the SuperLink holds it.

Replies are matched to the message they answer, not to their sender: when a node stops sending heartbeats
the SuperLink itself answers for it ("Node Unavailable"), and that reply's sender is the SuperLink.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from flwr.app import Message
from flwr.serverapp import Grid

POLL_SECONDS = 1.0


def replies_as_they_arrive(grid: Grid, messages: list[Message], *, timeout: float,
                           poll: float = POLL_SECONDS) -> Iterator[tuple[int, Message | None]]:
    """Push `messages`, then yield ``(node, reply)`` for each reply as it arrives, then ``(node, None)`` for
    every node with no reply after `timeout` seconds. A reply that reached the SuperLink before the deadline
    is taken even if the caller's work on earlier replies runs past it."""
    ids = list(grid.push_messages(messages))
    pending = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages) if mid}
    unsent = [msg.metadata.dst_node_id for mid, msg in zip(ids, messages) if not mid]
    deadline = time.monotonic() + timeout
    while pending:
        expired = time.monotonic() >= deadline
        for mid in list(pending):
            for reply in grid.pull_messages([mid]):
                yield pending.pop(mid), reply
                break
        if expired or not pending:
            break
        time.sleep(poll)
    for node in [*pending.values(), *unsent]:
        yield node, None
