"""Checking a site's audit log against the server's, and printing either as a table.

The chain shows edits, removals and reorderings inside a log, but not entries cut from its end nor a
chain rewritten whole. Each log anchors the other: the server records the audit head every site
reports with its reply, so a site log missing the entry of a recorded head was truncated or rewritten;
and every request a site logged must appear among what the server logged sending, so a server log
missing it was truncated or edited. Both must also agree on every hash they share (request sent =
request received, reply sent = reply received).

An entry's hash proves only that nobody changed it since it was chained, not that tba-fed wrote it: a
site or server entry (``role``) is read through the schema tba-fed writes, and one that does not fit is
a problem of the log, reported with its line, never a crash of the verifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..audit import AuditCheck, Problem

_AS_WRITTEN = ConfigDict(extra="allow", strict=True, allow_inf_nan=False, frozen=True)


class SiteRecord(BaseModel):
    """What the server logged about one site (or the secure sum) in one round."""

    model_config = _AS_WRITTEN

    status: str = ""
    sent_sha256: str | None = None
    received_sha256: str | None = None
    site_head: str | None = None


class _Entry(BaseModel):
    model_config = _AS_WRITTEN

    role: str
    seq: int
    time: str
    hash: str
    run_id: str
    round: str


class ServerEntry(_Entry):
    role: Literal["server"]
    message_type: str | None = None  # the result entry has none
    sites: dict[str, SiteRecord] = Field(default_factory=dict)
    maps_sha256: str | None = None


class Grant(BaseModel):
    """The ledger's record of a release, as a site logs it."""

    model_config = _AS_WRITTEN

    mechanism: str = ""
    noise_multiplier: float | None = None
    aggregation: str = ""
    noise: str = ""


class SiteEntry(_Entry):
    role: Literal["site"]
    site: str
    message_type: str
    status: str
    request_sha256: str
    sent_sha256: str | None = None  # a refused request sent nothing
    sent: dict[str, Any] = Field(default_factory=dict)
    grant: Grant | None = None
    error: str = ""


Typed = SiteEntry | ServerEntry


@dataclass
class Entries:
    """A log's entries in order, each with its line: a site or server entry read through its schema, or None for
    an entry without a role (a generic chain: `tba_fed.audit` alone); entries that do not fit are problems."""

    rows: list[tuple[int, dict[str, Any], Typed | None]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def of(self, kind: type[Typed]) -> list[tuple[int, Any]]:
        return [(line, typed) for line, _, typed in self.rows if isinstance(typed, kind)]

    @property
    def role(self) -> str | None:
        """site or server if every entry is readable and has that role, else None."""
        roles = {typed.role if typed is not None else None for _, _, typed in self.rows}
        return roles.pop() if not self.problems and len(roles) == 1 else None


_SCHEMAS: dict[str, type[Typed]] = {"site": SiteEntry, "server": ServerEntry}


def read_entries(check: AuditCheck) -> Entries:
    """Every entry of a checked log read through its role's schema; one with another role, or that does not
    fit, is a problem naming its line and first offending field."""
    entries = Entries()
    for line, raw in zip(check.lines, check.entries, strict=True):
        if "role" not in raw:
            entries.rows.append((line, raw, None))
            continue
        role = raw["role"]
        schema = _SCHEMAS.get(role) if isinstance(role, str) else None
        if schema is None:
            entries.problems.append(Problem(check.path, line, raw["seq"], f"role {str(role)[:40]!r} is neither site "
                                                                          "nor server"))
            continue
        try:
            entries.rows.append((line, raw, schema.model_validate(raw)))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            entries.problems.append(Problem(check.path, line, raw["seq"], f"not a {role} entry as tba-fed writes it "
                                                                          f"({where}: {first['msg']})"))
    return entries


def cross_check(one: AuditCheck, other: AuditCheck) -> tuple[list[Problem], str]:
    """Problems found between a site log and the server log (either order), and a summary of what matched;
    entries that do not fit their role's schema are problems, and leave the logs unmatched."""
    read = {check.path: read_entries(check) for check in (one, other)}
    problems = [p for entries in read.values() for p in entries.problems]
    roles = {entries.role: (path, entries) for path, entries in read.items()}
    if set(roles) != {"site", "server"}:
        held = [f"{check.path} {read[check.path].role or 'mixed, unreadable or no'}" for check in (one, other)]
        return problems + [Problem(one.path, None, None, f"--against needs one site log and one server log; "
                                                         f"{held[0]} entries, {held[1]} entries")], ""
    (site_path, site), (server_path, server) = roles["site"], roles["server"]
    site_entries: list[tuple[int, SiteEntry]] = site.of(SiteEntry)
    names = {entry.site for _, entry in site_entries}
    by_hash = {entry.hash: (line, entry) for line, entry in site_entries}
    heads = requests = 0
    sent: dict[tuple[str, str | None], set[str]] = {}  # (run id, message type) -> request hashes the server sent
    server_entries: list[tuple[int, ServerEntry]] = server.of(ServerEntry)
    for line, entry in server_entries:
        key = (entry.run_id, entry.message_type)
        for name, record in entry.sites.items():
            if record.sent_sha256 is not None:
                sent.setdefault(key, set()).add(record.sent_sha256)
            if name not in names or record.site_head is None:
                continue
            heads += 1
            found = by_hash.get(record.site_head)
            where = f"{server_path}:{line} (round {entry.round} of run {entry.run_id})"
            if found is None:
                problems.append(Problem(site_path, None, None,
                                        f"{where} records {name}'s audit head {record.site_head[:12]}…, which is "
                                        "not in this log: entries were cut from its end or it was rewritten"))
                continue
            site_line, site_entry = found
            for field_name, actual, expected, what in (
                    ("request_sha256", site_entry.request_sha256, record.sent_sha256, "request the server sent"),
                    ("sent_sha256", site_entry.sent_sha256, record.received_sha256, "reply the server received")):
                if actual != expected:
                    problems.append(Problem(site_path, site_line, site_entry.seq,
                                            f"{field_name} {str(actual)[:12]}… differs from the {what} "
                                            f"({str(expected)[:12]}…, {where})"))
    runs = {entry.run_id for _, entry in server_entries}
    for line, entry in site_entries:
        if entry.run_id not in runs:
            continue  # a run of another server, or one this server's log never held (only a --head can tell)
        requests += 1
        if entry.request_sha256 not in sent.get((entry.run_id, entry.message_type), set()):
            problems.append(Problem(server_path, None, None,
                                    f"{site_path}:{line} (seq {entry.seq}) records a {entry.message_type} request "
                                    f"of run {entry.run_id} (sha256 {entry.request_sha256[:12]}…) that this log "
                                    "does not record sending: entries were cut from its end or it was edited"))
    return problems, f"{heads} site heads and {requests} site requests matched against {server_path}"


def _cells(entry: Typed | None) -> str:
    """run | round | who | status | mechanism | what"""
    if isinstance(entry, SiteEntry):
        grant = entry.grant or Grant()
        mechanism = grant.mechanism
        if grant.noise_multiplier is not None:
            mechanism += f" σ={grant.noise_multiplier:.4g} ({grant.aggregation}, {grant.noise})"
        what = f"{len(entry.sent)} values sent" if entry.status == "ok" else entry.error
        return f"{entry.run_id} | {entry.round} | {entry.site} | {entry.status} | {mechanism} | {what}"
    if isinstance(entry, ServerEntry):
        sites = ", ".join(f"{name} {record.status}".strip() for name, record in entry.sites.items())
        return f"{entry.run_id} | {entry.round} | server | | | {sites or f'maps sha256 {str(entry.maps_sha256)[:12]}…'}"
    return " | | | | | "  # an entry without a role: only its place in the chain


def audit_table(check: AuditCheck) -> str:
    """Markdown: one row per entry (``tba-fed audit show``); an entry that does not fit its role's schema is
    counted among the problems and shown by its seq alone."""
    entries = read_entries(check)
    problems = len(check.problems) + len(entries.problems)
    lines = [f"# Audit log {check.path}", "", f"- {len(check.entries)} entries; head `{check.head}`"
             + (f"; {problems} problems (run `tba-fed audit verify`)" if problems else ""), "",
             "| seq | time | run | round | who | status | mechanism | what |", "|---|---|---|---|---|---|---|---|"]
    shown = {line: typed for line, _, typed in entries.rows}
    for line, raw in zip(check.lines, check.entries, strict=True):
        cells = _cells(shown[line]) if line in shown else "| | | unreadable | | see `tba-fed audit verify`"
        lines.append(f"| {raw['seq']} | {str(raw['time'])[:40]} | {cells} |")
    return "\n".join(lines) + "\n"
