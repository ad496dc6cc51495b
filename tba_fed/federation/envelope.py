"""Which run and round a reply answers: the server stamps every request, the site echoes the stamp.

A reply whose echo does not match the request it is taken as the answer to (a stale reply of an
earlier round, a reply replayed from another run, a misrouted one) is refused before its arrays are
decoded, so its sums can never be added to this round's.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from ..errors import TBAInputError

ROUND, RUN = "round", "run-id"
HEAD_KEY = "audit-head"  # the reply's meta field carrying the site's audit head (site_audit, server_audit)


def stamp(msg: Message, round_name: str) -> None:
    config = msg.content.config_records.setdefault("config", ConfigRecord())
    config[ROUND] = round_name
    config[RUN] = int(msg.metadata.run_id)


def echo(msg: Message) -> dict[str, Any]:
    """The site's side: the stamp of the request it answers, for its reply's ``meta`` record."""
    config = msg.content.config_records.get("config", ConfigRecord())
    return {ROUND: str(config.get(ROUND, "")), RUN: int(config.get(RUN, -1))}


def check_echo(reply: RecordDict, request: Message, site_name: str) -> None:
    """Refuse a reply whose ``meta`` does not echo the round and run of `request`, or that claims a site name
    the server already gave another node (`site_name` is the name the server knows this node by)."""
    meta = reply.config_records.get("meta")
    if meta is None:
        raise TBAInputError("meta", "the reply carries no meta record", "sites must answer with tba-fed's ClientApp")
    if "site" in meta and str(meta["site"]) != site_name:
        raise TBAInputError("meta.site", f"{meta['site']!r} is already the name of another site",
                            "give every site a unique name in its site YAML")
    sent = request.content.config_records["config"]
    for key in (ROUND, RUN):
        if key not in meta:
            raise TBAInputError(f"meta.{key}", "missing: the reply does not say which request it answers",
                                "update the site to this version of tba-fed")
        if meta[key] != sent[key]:
            raise TBAInputError(f"meta.{key}", f"the reply answers {key} {meta[key]!r}, this request is {sent[key]!r}")
