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

from tba_fed.errors import FederationError
from tba_fed.federation import delivery
from tba_fed.federation.delivery import BoundedGrid, replies_as_they_arrive
from tba_fed.federation.flower_internals import ErrorCode, RunNotRunningException

from answering_grid import AnsweringGrid

pytestmark = pytest.mark.usefixtures("server_identity")
SUPERLINK = 1  # Flower's SUPERLINK_NODE_ID: the sender of the errors the SuperLink generates


class RestartingSites(AnsweringGrid):
    """Nodes 11, 12, 13. `offline` nodes are reported unavailable (the SuperLink's error reply) and come
    back after `down` get_node_ids calls; every message each node received is kept in `asked`."""

    def __init__(self, offline: set[int], down: int) -> None:
        super().__init__()
        self.offline, self.down = set(offline), down
        self.asked: dict[int, list[Message]] = {11: [], 12: [], 13: []}

    def get_node_ids(self) -> list[int]:
        self.down -= 1
        return [n for n in self.asked if n not in self.offline or self.down < 0]

    def answer(self, messages):
        replies = []
        for msg in messages:
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


def _collect(grid, nodes, timeout) -> dict[int, list]:
    return dict(replies_as_they_arrive(grid, _messages(nodes), timeout=timeout))


def _messages(nodes) -> list[Message]:
    return [Message(content=RecordDict({"config": ConfigRecord({"n": node})}), dst_node_id=node,
                    message_type="query.statistics") for node in nodes]


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(delivery, "POLL_SECONDS", 0.05)


def test_a_site_offline_mid_round_is_asked_again_with_the_same_request_when_it_reconnects():
    grid = RestartingSites(offline={12}, down=3)
    replies = _collect(grid, [11, 12, 13], timeout=5)
    assert sorted(replies) == [11, 12, 13] and not any(r.has_error() for rs in replies.values() for r in rs)
    assert [len(replies[n]) for n in (11, 12, 13)] == [1, 1, 1]  # the SuperLink's offline error is no reply: not a duplicate
    assert [len(grid.asked[n]) for n in (11, 12, 13)] == [1, 2, 1]  # only the site that went away, once more
    first, again = grid.asked[12]
    assert again.metadata.message_id != first.metadata.message_id and again.content is first.content
    assert again.metadata.message_type == "query.statistics"


class RestartedBetweenPolls(AnsweringGrid):
    """Node 12's SuperNode takes its first message, then stops and starts again before the server's next
    pull: never reported offline, only its activation time changes. Its later messages it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: dict[int, list[Message]] = {11: [], 12: [], 13: []}

    def get_node_ids(self) -> list[int]:
        return list(self.asked)  # connected before the round

    def answer(self, messages):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.asked[node].append(msg)
            if node == 12 and len(self.asked[12]) == 1:  # delivered to the life that was stopped
                self.lost(msg)
                continue
            replies.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False,
                                           content=msg.content))
        return replies

    def lost(self, msg: Message) -> None:
        """Node 12's first message: its SuperNode stops and starts again."""
        self.restart()

    def restart(self) -> None:
        self.activated[12] = "2026-01-01T00:00:07+00:00"


def test_a_site_restarted_between_two_pulls_is_asked_again_from_its_new_activation_time():
    grid = RestartedBetweenPolls()
    replies = _collect(grid, [11, 12, 13], timeout=2)
    assert sorted(replies) == [11, 12, 13] and [len(replies[n]) for n in (11, 12, 13)] == [1, 1, 1]
    assert [len(grid.asked[n]) for n in (11, 12, 13)] == [1, 2, 1]
    first, again = grid.asked[12]
    assert again.metadata.message_id != first.metadata.message_id and again.content is first.content


def test_a_site_that_does_not_reconnect_in_time_keeps_the_superlinks_error_and_the_round_ends_on_time():
    grid = RestartingSites(offline={12}, down=10**6)
    start = time.monotonic()
    replies = _collect(grid, [11, 12, 13], timeout=0.5)
    assert 0.4 < time.monotonic() - start < 2
    (error,) = replies[12]
    assert error.has_error() and error.error.code == ErrorCode.NODE_UNAVAILABLE  # filed under the site
    assert not replies[11][0].has_error() and len(grid.asked[12]) == 1


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


def test_a_pull_in_a_run_the_superlink_no_longer_runs_ends_with_what_to_do():
    class Stopped(Sites):
        def pull_messages(self, message_ids):
            raise RunNotRunningException

    with pytest.raises(FederationError, match=r"no longer runs this run \(stopped with `flwr stop`, or marked failed"):
        dict(replies_as_they_arrive(BoundedGrid(Stopped(), patience=5), _messages([11]), timeout=1))


class Sites(AnsweringGrid):
    """Every node answers its message with `copies` replies (2: a duplicate); `refused` nodes' messages the
    SuperLink does not accept (its push returns no id for them)."""

    def __init__(self, copies: dict[int, int] | None = None, refused: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.copies, self.refused = copies or {}, refused

    def answer(self, messages):
        return [SimpleNamespace(metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id), has_error=lambda: False,
                                content=m.content) for m in messages for _ in range(self.copies.get(m.metadata.dst_node_id, 1))]

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        return [None if m.metadata.dst_node_id in self.refused else i for m, i in zip(messages, ids)]


def test_replies_are_pulled_one_at_a_time_so_the_caller_judges_each_before_the_next_is_fetched():
    grid = Sites()
    waiting = []
    for node, replies in replies_as_they_arrive(grid, _messages([11, 12, 13]), timeout=5):
        waiting.append((node, len(replies), len(grid._waiting)))
    assert waiting == [(11, 1, 2), (12, 1, 1), (13, 1, 0)]  # the others still at the SuperLink when one is judged


def test_several_replies_to_one_request_come_together_and_a_request_the_superlink_refused_comes_with_none():
    replies = dict(replies_as_they_arrive(Sites(copies={12: 2}, refused=frozenset({13})), _messages([11, 12, 13]),
                                          timeout=5))
    assert {node: len(rs) for node, rs in replies.items()} == {11: 1, 12: 2, 13: 0}


class LateSite(AnsweringGrid):
    """Node 12 answers only after `delay` seconds; 11 at once."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay, self.start = delay, time.monotonic()

    def answer(self, messages):
        self.late = {m.metadata.message_id: m for m in messages if m.metadata.dst_node_id == 12}
        return [SimpleNamespace(metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id), has_error=lambda: False,
                                content=m.content) for m in messages if m.metadata.dst_node_id != 12]

    def pull_messages(self, message_ids):
        message_ids = list(message_ids)
        if time.monotonic() - self.start >= self.delay:
            for message_id in [i for i in message_ids if i in self.late]:
                message = self.late.pop(message_id)
                self._waiting[message_id] = [SimpleNamespace(metadata=SimpleNamespace(src_node_id=12),
                                                             has_error=lambda: False, content=message.content)]
        return super().pull_messages(message_ids)


def test_a_reply_is_taken_as_soon_as_it_arrives_and_one_after_the_deadline_is_not():
    start = time.monotonic()
    arrivals = [(node, round(time.monotonic() - start, 1))
                for node, _ in replies_as_they_arrive(LateSite(delay=0.3), _messages([11, 12]), timeout=5)]
    assert [node for node, _ in arrivals] == [11, 12] and arrivals[0][1] < 0.1 and 0.3 <= arrivals[1][1] < 0.5
    assert dict(replies_as_they_arrive(LateSite(delay=1.0), _messages([11, 12]), timeout=0.3)).keys() == {11}


class HalfUploaded(RestartedBetweenPolls):
    """Node 12's SuperNode stops while uploading its reply to its first message: the SuperLink holds the pull of
    that message until the upload's push session expires (`upload_seconds` here, 180 s in Flower), then
    answers it with MESSAGE_UNAVAILABLE. `restarts`: the SuperNode comes back (a new activation time) before
    the server's next pull ("before") or while the server's pull waits for the reply ("during"); by default it
    stays connected. Node 12 answers its later messages; 11 and 13 answer at once."""

    def __init__(self, restarts: str | None, upload_seconds: float) -> None:
        super().__init__()
        self.restarts, self.upload_seconds = restarts, upload_seconds
        self.half: set[str] = set()
        self.pulled_half = 0

    def lost(self, msg: Message) -> None:
        self.half.add(msg.metadata.message_id)
        if self.restarts == "before":
            self.restart()

    def pull_messages(self, message_ids):
        message_ids = list(message_ids)
        for message_id in set(message_ids) & self.half:
            self.pulled_half += 1
            if self.restarts == "during":
                self.restart()
            time.sleep(self.upload_seconds)  # Flower's pull_objects, retrying the parts that never come
            self.half.discard(message_id)
            self._waiting[message_id] = [SimpleNamespace(
                metadata=SimpleNamespace(src_node_id=SUPERLINK, reply_to_message_id=message_id), has_error=lambda: True,
                error=SimpleNamespace(code=ErrorCode.MESSAGE_UNAVAILABLE, reason="Reply message objects are unavailable"))]
        return super().pull_messages(message_ids)


def test_a_site_restarted_with_its_reply_half_uploaded_is_asked_again_without_pulling_the_half_reply():
    """The CI failure of stop 22: hospital-c was stopped while sending its statistics and started again; the
    server pulled the half-uploaded reply first, the pull outlasted round_timeout and the run ended with "the
    SuperLink did not answer (pull_messages)" although the SuperLink was up."""
    grid = HalfUploaded(restarts="before", upload_seconds=30)
    start = time.monotonic()
    replies = dict(replies_as_they_arrive(BoundedGrid(grid, patience=1.0), _messages([11, 12, 13]), timeout=5))
    assert time.monotonic() - start < 2 and grid.pulled_half == 0
    assert sorted(replies) == [11, 12, 13] and not any(r.has_error() for rs in replies.values() for r in rs)
    assert [len(grid.asked[n]) for n in (11, 12, 13)] == [1, 2, 1]


def test_a_site_restarted_while_the_server_pulls_its_half_uploaded_reply_is_asked_again_at_once():
    """What test_restarts.py met most often: the server was already pulling hospital-c's reply, waiting for its
    parts, when hospital-c was stopped and started again; the pull lasted until the push session expired
    (194 s), by then the round was over and hospital-c was excluded."""
    grid = HalfUploaded(restarts="during", upload_seconds=30)
    start = time.monotonic()
    replies = dict(replies_as_they_arrive(BoundedGrid(grid, patience=1.0), _messages([11, 12, 13]), timeout=5))
    assert time.monotonic() - start < 2 and grid.pulled_half == 1
    assert sorted(replies) == [11, 12, 13] and not any(r.has_error() for rs in replies.values() for r in rs)
    assert [len(grid.asked[n]) for n in (11, 12, 13)] == [1, 2, 1]


def test_a_pull_that_waits_for_an_upload_past_patience_goes_on_while_the_superlink_answers(caplog, monkeypatch):
    monkeypatch.setattr(delivery, "PROGRESS_SECONDS", 1.0)
    grid = HalfUploaded(restarts=None, upload_seconds=2.5)
    start = time.monotonic()
    with caplog.at_level("INFO", logger=delivery.__name__):
        replies = dict(replies_as_they_arrive(BoundedGrid(grid, patience=1.0), _messages([11, 12, 13]), timeout=10))
    # the reply lost in upload is asked for again, like one lost to a site that went offline
    assert 2.5 <= time.monotonic() - start < 5 and grid.pulled_half == 1
    assert sorted(replies) == [11, 12, 13] and not any(r.has_error() for rs in replies.values() for r in rs)
    assert [len(grid.asked[n]) for n in (11, 12, 13)] == [1, 2, 1]
    waits = [r.getMessage() for r in caplog.records if "still being received" in r.getMessage()]
    assert len(waits) == 2 and waits[0].startswith("node 12: its reply still being received after 1 s")


class DiesDuringPull(Sites):
    """The SuperLink gone while a pull is under way: that pull and every later call retry without limit."""

    def __init__(self) -> None:
        super().__init__()
        self.gone = threading.Event()

    def pull_messages(self, message_ids):
        self.gone.set()
        threading.Event().wait()

    def get_nodes(self):
        if self.gone.is_set():
            threading.Event().wait()
        return super().get_nodes()


def test_a_pull_waiting_for_a_superlink_that_is_gone_still_ends_the_run():
    start = time.monotonic()
    with pytest.raises(FederationError, match=r"^the SuperLink did not answer \(get_nodes\) within 1 s: it is down"):
        dict(replies_as_they_arrive(BoundedGrid(DiesDuringPull(), patience=1.0), _messages([11]), timeout=10))
    assert 1 <= time.monotonic() - start < 3  # a look at the nodes every POLL_SECONDS, each bounded by patience
