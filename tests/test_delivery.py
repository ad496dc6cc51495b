"""Delivery of a round's messages: no Grid call outlives its deadline, and a site that goes offline
mid-round is asked again when it reconnects. The stand-in grid answers the way Flower's does (error
replies the SuperLink generates come from its own node id and name the message they answer); the real
processes are exercised in test_restarts.py."""

from __future__ import annotations

import signal
import threading
import time
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.run import RunNotRunningException

from tba_fed.errors import FederationError
from tba_fed.federation import delivery
from tba_fed.federation.delivery import BoundedGrid, send_and_receive

pytestmark = pytest.mark.usefixtures("server_identity")
SUPERLINK = 1  # Flower's SUPERLINK_NODE_ID: the sender of the errors the SuperLink generates


class RestartingSites:
    """Nodes 11, 12, 13. `offline` nodes are reported unavailable (the SuperLink's error reply) and come
    back after `down` get_node_ids calls; every message each node received is kept in `asked`."""

    def __init__(self, offline: set[int], down: int) -> None:
        self.offline, self.down = set(offline), down
        self.asked: dict[int, list[Message]] = {11: [], 12: [], 13: []}

    def get_node_ids(self) -> list[int]:
        self.down -= 1
        return [n for n in self.asked if n not in self.offline or self.down < 0]

    def send_and_receive(self, messages, *, timeout):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what Flower's grid does when it pushes
            node = msg.metadata.dst_node_id
            self.asked[node].append(msg)
            if node in self.offline and self.down >= 0:
                replies.append(SimpleNamespace(
                    metadata=SimpleNamespace(src_node_id=SUPERLINK, reply_to_message_id=msg.metadata.message_id),
                    has_error=lambda: True, error=SimpleNamespace(code=ErrorCode.NODE_UNAVAILABLE, reason="offline")))
            else:
                replies.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False,
                                               content=msg.content))
        return replies


def _messages(nodes) -> list[Message]:
    return [Message(content=RecordDict({"config": ConfigRecord({"n": node})}), dst_node_id=node,
                    message_type="query.statistics") for node in nodes]


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(delivery, "POLL_SECONDS", 0.05)


def test_a_site_offline_mid_round_is_asked_again_with_the_same_request_when_it_reconnects():
    grid = RestartingSites(offline={12}, down=3)
    replies, counts = send_and_receive(grid, _messages([11, 12, 13]), timeout=5)
    assert sorted(replies) == [11, 12, 13] and not any(r.has_error() for r in replies.values())
    assert counts == {11: 1, 12: 1, 13: 1}  # the SuperLink's offline error is no reply of the site's: not a duplicate
    assert [len(grid.asked[n]) for n in (11, 12, 13)] == [1, 2, 1]  # only the site that went away, once more
    first, again = grid.asked[12]
    assert again.metadata.message_id != first.metadata.message_id and again.content is first.content
    assert again.metadata.message_type == "query.statistics"


def test_a_site_that_does_not_reconnect_in_time_keeps_the_superlinks_error_and_the_round_ends_on_time():
    grid = RestartingSites(offline={12}, down=10**6)
    start = time.monotonic()
    replies, counts = send_and_receive(grid, _messages([11, 12, 13]), timeout=0.5)
    assert 0.4 < time.monotonic() - start < 2
    assert replies[12].has_error() and replies[12].error.code == ErrorCode.NODE_UNAVAILABLE  # filed under the site
    assert not replies[11].has_error() and len(grid.asked[12]) == 1 and counts[12] == 0


class SuperLinkGone:
    """Flower's HttpGrid while the SuperLink is down: it retries a refused connection without limit."""

    def __init__(self) -> None:
        self.never = threading.Event()

    def get_node_ids(self):
        self.never.wait()


def test_a_grid_call_waiting_for_a_superlink_that_is_gone_ends_the_run_at_its_deadline():
    grid = BoundedGrid(SuperLinkGone(), patience=1.0)
    start = time.monotonic()
    with pytest.raises(FederationError, match=r"^the SuperLink did not answer \(get_node_ids\) within 1 s: it is down "
                                              r"or unreachable, so the run stops\. Restart it with the same --database"):
        grid.get_node_ids()
    assert time.monotonic() - start < 3


class Stop(Exception):
    pass


def test_a_waiting_grid_call_still_lets_the_process_stop_on_a_signal_from_another_thread():
    """Flower's parent-pid monitor stops a ServerApp by raising SIGINT from its own thread: the main thread,
    waiting on a Grid call, must get to run the handler (here SIGUSR1's) well before the call's deadline."""
    def handler(signum, frame):
        raise Stop

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        threading.Timer(0.3, signal.raise_signal, args=(signal.SIGUSR1,)).start()
        start = time.monotonic()
        with pytest.raises(Stop):
            BoundedGrid(SuperLinkGone(), patience=60).get_node_ids()
        assert time.monotonic() - start < 2
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_run_the_superlink_no_longer_runs_ends_with_what_to_do():
    def stopped(*args, **kwargs):
        raise RunNotRunningException

    grid = BoundedGrid(SimpleNamespace(send_and_receive=stopped, run=SimpleNamespace(run_id=7)), patience=5)
    with pytest.raises(FederationError, match=r"no longer runs this run \(stopped with `flwr stop`, or marked failed"):
        grid.send_and_receive(_messages([11]), timeout=1)
    assert grid.run.run_id == 7  # what does not reach the SuperLink passes through
