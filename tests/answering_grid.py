"""The Grid calls the server makes of Flower's (`push_messages`, `pull_messages`), over stand-in sites
that answer the moment a message is pushed. Replies are filed under the message they answer, as the
SuperLink files them: by `reply_to_message_id` when a reply names it (the SuperLink's own error replies
do), else by the node that sent it. Nodes are online from when they are first listed or sent a message, with
the activation time (Flower's ``NodeInfo.last_activated_at``) in `activated`, as a SuperLink keeps it: set
once when a node comes online."""

from __future__ import annotations

from collections.abc import Iterable

from tba_fed.federation.flower_internals import NodeInfo

FIRST_ACTIVATION = "2026-01-01T00:00:00+00:00"


class AnsweringGrid:
    """Subclasses implement `answer(messages)`: the replies the sites send, in any number per message."""

    def __init__(self) -> None:
        self._waiting: dict[str, list] = {}
        self.activated: dict[int, str] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.activated)

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=node, last_activated_at=self.activated.setdefault(node, FIRST_ACTIVATION))
                for node in self.get_node_ids()]

    def answer(self, messages: list) -> list:
        raise NotImplementedError

    def push_messages(self, messages: Iterable) -> list[str]:
        messages = list(messages)
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what Flower's grid does when it pushes
        by_node = {msg.metadata.dst_node_id: msg.metadata.message_id for msg in messages}
        for node in by_node:
            self.activated.setdefault(node, FIRST_ACTIVATION)
        for reply in self.answer(messages):
            message_id = getattr(reply.metadata, "reply_to_message_id", None) or by_node[reply.metadata.src_node_id]
            self._waiting.setdefault(message_id, []).append(reply)
        return [msg.metadata.message_id for msg in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> list:
        """Every reply to `message_ids` that is in, once (the SuperLink deletes what it has delivered)."""
        return [reply for message_id in message_ids for reply in self._waiting.pop(message_id, [])]
