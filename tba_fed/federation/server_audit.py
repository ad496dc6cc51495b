"""The server's audit trail: per round, what it sent each site and what came back.

One entry per round: the message type, the names and shapes of the arrays sent, and per site the
sha256 of the request it was sent, its status (and reason), the sha256, names and shapes of its reply,
and the audit head the site reported, which anchors the site's own log (``audit_check.cross_check``).
A last entry records the maps and report the run produced. The log is checked when the run starts, so
a server whose log does not verify runs nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, RecordDict

from ..audit import AuditLog
from .envelope import HEAD_KEY
from .records import content_sha256, received_schema, to_record

if TYPE_CHECKING:
    from .secure_aggregation import SecureSum


def reply_receipt(reply: Message) -> dict[str, Any]:
    """What the audit keeps of a site's reply (not an error): its sha256, names and shapes, and the site's
    audit head; taken as the reply is judged, so the reply itself need not be kept for the round's entry."""
    receipt: dict[str, Any] = {"received_sha256": content_sha256(reply.content), "received": received_schema(reply.content)}
    meta = reply.content.config_records.get("meta")
    if meta is not None and HEAD_KEY in meta:
        receipt["site_head"] = str(meta[HEAD_KEY])
    return receipt


class ServerAudit:
    def __init__(self, path: Path, run_id: str) -> None:
        self.log = AuditLog(path)
        self.log.verified()  # fail before any site works, not after
        self.run_id = run_id

    def _append(self, round_name: str, **fields: Any) -> None:
        self.log.append({"role": "server", "run_id": self.run_id, "round": round_name, **fields})

    def round(self, name: str, outcomes: Mapping[str, Mapping[str, Any]], message_type: str,
              contents: Mapping[int, RecordDict], receipts: Mapping[int, Mapping[str, Any]]) -> None:
        """A message round of `rounds.exchange`, after every reply was judged (before too few valid ones fail it):
        `outcomes` its `RoundLog.sites`; `receipts`: `reply_receipt` of each node's reply, taken as it was judged."""
        sites = {site: {"node_id": o["node_id"], "status": o["status"], "sent_sha256": content_sha256(contents[o["node_id"]]),
                        **({"reason": o["reason"]} if "reason" in o else {}), **receipts.get(o["node_id"], {})}
                 for site, o in outcomes.items()}
        sent = received_schema(next(iter(contents.values()))) if contents else {}
        self._append(name, message_type=message_type, sent=sent, sites=sites)

    def secure_round(self, name: str, names: Mapping[int, str], nodes: list[int], config: Mapping[str, Any],
                     result: SecureSum | None, error: str | None = None) -> None:
        """The SecAgg+ statistics round: the config every node (`names`: the sites' names by node) was sent, and
        the sum (or why there is none)."""
        sent = content_sha256(RecordDict({"config": ConfigRecord(dict(config))}))
        sites: dict[str, dict[str, Any]] = {names.get(node, f"node-{node}"): {"node_id": node, "sent_sha256": sent}
                                            for node in nodes}
        if result is None:
            sites["secure sum"] = {"status": "failed", "reason": error}
        else:
            summed = RecordDict({"statistics": to_record(result.arrays)})
            sites["secure sum"] = {"status": "ok", "sites_summed": result.sites, "received_sha256": content_sha256(summed),
                                   "received": received_schema(summed)}
        self._append(name, message_type="train", sent={}, sites=sites)

    def result(self, maps_sha256: str, output: Path, report_json: str) -> None:
        self._append("result", maps_sha256=maps_sha256, output=str(output),
                     report_sha256=hashlib.sha256(report_json.encode()).hexdigest())
