"""A stand-in Grid over real ClientApps: each Message, serialised and parsed again like on the wire, goes
to a real ClientApp (its mods applied) with its node's own persistent Context, and an exception the
ClientApp raises comes back as the error reply the SuperNode makes of it
(flwr/supernode/runtime/run_clientapp.py). It answers both Grid APIs: ``send_and_receive`` (the SecAgg+
workflow) and ``push_messages``/``pull_messages`` (the server's rounds, see answering_grid.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

from flwr.app import Context, Error, Message, RecordDict

from answering_grid import AnsweringGrid
from tba_fed.federation.flower_internals import wire_copy as wire  # the message as the other side receives it


class ClientAppGrid(AnsweringGrid):
    """Nodes 100, 101, ...: simulated sites (``partition-id`` 0..num_nodes-1), or one node per entry of
    `node_configs` (e.g. ``{"site-config": ...}``, a deployed site). Nodes in `silent` never answer.
    `received` keeps every reply the server got, `raised` the repr of every exception a ClientApp raised."""

    def __init__(self, app, num_nodes: int = 0, silent: tuple[int, ...] = (),
                 node_configs: Sequence[Mapping[str, Any]] | None = None) -> None:
        super().__init__()
        self.app, self.silent = app, silent
        self.run = SimpleNamespace(run_id=1)
        configs = node_configs or [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config=dict(config), state=RecordDict(),
                                          run_config={}) for i, config in enumerate(configs)}
        self.received: list[Message] = []
        self.raised: dict[int, str] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def answer(self, messages: list[Message]) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.silent:  # a site that went away: no reply
                continue
            delivered = wire(msg)
            try:
                reply = self.app(delivered, self.contexts[node])
            except Exception as err:  # what the SuperNode does with a ClientApp exception
                self.raised[node] = repr(err)
                reply = Message(Error(code=2, reason=str(type(err)) + ":<'" + str(err) + "'>"), reply_to=delivered)
            replies.append(wire(reply))
        self.received += replies
        return replies

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return self.answer(list(messages))
