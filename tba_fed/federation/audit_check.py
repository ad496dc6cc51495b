"""Checking a site's audit log against the server's, and printing either as a table.

The chain shows edits, removals and reorderings inside a log, but not entries cut from its end nor a
chain rewritten whole. Each log anchors the other: the server records the audit head every site
reports with its reply, so a site log missing the entry of a recorded head was truncated or rewritten;
and every request a site logged must appear among what the server logged sending, so a server log
missing it was truncated or edited. Both must also agree on every hash they share (request sent =
request received, reply sent = reply received).
"""

from __future__ import annotations

from typing import Any

from ..audit import AuditCheck, Problem


def _role(check: AuditCheck) -> str | None:
    roles = {entry.get("role") for entry in check.entries}
    return roles.pop() if len(roles) == 1 else None


def cross_check(one: AuditCheck, other: AuditCheck) -> tuple[list[Problem], str]:
    """Problems found between a site log and the server log (either order), and a summary of what matched."""
    roles = {_role(one): one, _role(other): other}
    if set(roles) != {"site", "server"}:
        return [Problem(one.path, None, None, f"--against needs one site log and one server log; {one.path} holds "
                                              f"{_role(one) or 'mixed or no'} entries, {other.path} "
                                              f"{_role(other) or 'mixed or no'} entries")], ""
    site, server = roles["site"], roles["server"]
    names = {entry["site"] for entry in site.entries}
    by_hash = {entry["hash"]: (line, entry) for line, entry in zip(site.lines, site.entries, strict=True)}
    problems: list[Problem] = []
    heads = requests = 0
    sent: dict[tuple[str, str], set[str]] = {}  # (run id, message type) -> request hashes the server sent
    for line, entry in zip(server.lines, server.entries, strict=True):
        key = (entry.get("run_id"), entry.get("message_type"))
        for name, record in entry.get("sites", {}).items():
            if "sent_sha256" in record:
                sent.setdefault(key, set()).add(record["sent_sha256"])
            if name not in names or "site_head" not in record:
                continue
            heads += 1
            found = by_hash.get(record["site_head"])
            where = f"{server.path}:{line} (round {entry['round']} of run {entry['run_id']})"
            if found is None:
                problems.append(Problem(site.path, None, None,
                                        f"{where} records {name}'s audit head {record['site_head'][:12]}…, which is "
                                        "not in this log: entries were cut from its end or it was rewritten"))
                continue
            site_line, site_entry = found
            for field, expected, what in (("request_sha256", record["sent_sha256"], "request the server sent"),
                                          ("sent_sha256", record.get("received_sha256"), "reply the server received")):
                if site_entry.get(field) != expected:
                    problems.append(Problem(site.path, site_line, site_entry["seq"],
                                            f"{field} {str(site_entry.get(field))[:12]}… differs from the {what} "
                                            f"({str(expected)[:12]}…, {where})"))
    runs = {entry.get("run_id") for entry in server.entries}
    for line, entry in zip(site.lines, site.entries, strict=True):
        if entry["run_id"] not in runs:
            continue  # a run of another server, or one this server's log never held (only a --head can tell)
        requests += 1
        if entry["request_sha256"] not in sent.get((entry["run_id"], entry["message_type"]), set()):
            problems.append(Problem(server.path, None, None,
                                    f"{site.path}:{line} (seq {entry['seq']}) records a {entry['message_type']} request "
                                    f"of run {entry['run_id']} (sha256 {entry['request_sha256'][:12]}…) that this log "
                                    "does not record sending: entries were cut from its end or it was edited"))
    return problems, f"{heads} site heads and {requests} site requests matched against {server.path}"


def _cell(entry: dict[str, Any]) -> str:
    if entry.get("role") == "site":
        grant = entry.get("grant", {})
        mechanism = grant.get("mechanism", "")
        if "noise_multiplier" in grant:
            mechanism += f" σ={grant['noise_multiplier']:.4g} ({grant.get('aggregation', '')}, {grant.get('noise', '')})"
        what = f"{len(entry.get('sent', {}))} values sent" if entry["status"] == "ok" else entry.get("error", "")
        return f"{entry['site']} | {entry['status']} | {mechanism} | {what}"
    sites = ", ".join(f"{name} {record.get('status', '')}".strip() for name, record in entry.get("sites", {}).items())
    return f"server | | | {sites or 'maps sha256 ' + str(entry.get('maps_sha256', ''))[:12] + '…'}"


def audit_table(check: AuditCheck) -> str:
    """Markdown: one row per entry (``tba-fed audit show``)."""
    lines = [f"# Audit log {check.path}", "", f"- {len(check.entries)} entries; head `{check.head}`"
             + ("" if check.ok else f"; {len(check.problems)} problems (run `tba-fed audit verify`)"), "",
             "| seq | time | run | round | who | status | mechanism | what |", "|---|---|---|---|---|---|---|---|"]
    for entry in check.entries:
        lines.append(f"| {entry['seq']} | {entry['time']} | {entry.get('run_id', '')} | {entry.get('round', '')} "
                     f"| {_cell(entry)} |")
    return "\n".join(lines) + "\n"
