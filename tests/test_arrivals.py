"""Replies pulled one at a time as they arrive (a scripted stand-in Grid; the real Flower Grid runs in
test_simulation.py, test_deployment.py and benchmarks/scale_deployment.py)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from tba_fed.federation.arrivals import replies_as_they_arrive


class ScriptedGrid:
    """Node n's reply reaches the SuperLink `ready[n]` seconds after the push (None: never); node `unsent`
    is refused at push time, as Flower does with a malformed message."""

    def __init__(self, ready: dict[int, float | None], unsent: int | None = None) -> None:
        self.ready, self.unsent, self.pulls = ready, unsent, []

    def push_messages(self, messages):
        self.pushed = time.monotonic()
        return [None if m.metadata.dst_node_id == self.unsent else f"m{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, message_ids):
        self.pulls.append(list(message_ids))
        node = int(message_ids[0][1:])
        delay = self.ready[node]
        return [] if delay is None or time.monotonic() - self.pushed < delay else [f"reply of {node}"]


def _messages(*nodes: int):
    return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in nodes]


def test_replies_come_in_arrival_order_one_pull_each_and_the_silent_and_unsent_last():
    grid = ScriptedGrid({1: 0.3, 2: 0.0, 3: None, 4: 0.0}, unsent=4)
    start = time.monotonic()
    got = list(replies_as_they_arrive(grid, _messages(1, 2, 3, 4), timeout=0.6, poll=0.05))
    assert got == [(2, "reply of 2"), (1, "reply of 1"), (3, None), (4, None)]
    assert 0.6 <= time.monotonic() - start < 2.0  # waited for node 3 until the timeout, not longer
    assert all(len(ids) == 1 for ids in grid.pulls)  # never more than one reply in memory at once


def test_a_reply_in_before_the_deadline_is_taken_even_if_work_on_earlier_ones_ran_past_it():
    grid = ScriptedGrid({1: 0.0, 2: 0.1})
    got = []
    for node, reply in replies_as_they_arrive(grid, _messages(2, 1), timeout=0.2, poll=0.05):
        got.append((node, reply))
        if node == 1:
            time.sleep(0.4)  # validating node 1's reply outlasts the timeout; node 2's reply came meanwhile
    assert got == [(1, "reply of 1"), (2, "reply of 2")]
    assert grid.pulls == [["m2"], ["m1"], ["m2"]]  # node 2 was not in yet at the first pull


def test_an_error_reply_the_superlink_writes_for_a_lost_node_is_matched_to_that_node():
    """Flower answers itself for a node that missed its heartbeats; that reply's sender is the SuperLink
    (node 0), so replies are matched to the message they answer, not to their sender."""
    lost = SimpleNamespace(metadata=SimpleNamespace(src_node_id=0), has_error=lambda: True)
    grid = ScriptedGrid({5: 0.0})
    grid.pull_messages = lambda ids: [lost]
    assert list(replies_as_they_arrive(grid, _messages(5), timeout=1.0)) == [(5, lost)]
