"""A site's own report.html: its budget and what its ledger has spent of it, per run and per release, and whether
its audit log verifies (`tba-fed privacy report SITE.yaml --html OUT`).

Everything comes from the site's own files (YAML, ledger, audit log): the server never sees a site's budget.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..audit import check_chain
from ..privacy.accounting import replace_one_epsilon
from ..privacy.ledger import PrivacyLedger
from ..report_html import render
from .audit_check import SiteEntry, read_entries
from .config import SiteConfig


def site_view(site: SiteConfig) -> dict[str, Any]:
    """What the page shows, as plain data: policy, ε spent (all runs composed) against the budget, each run's
    releases, and the audit log's verification with its requests counted by status."""
    policy = site.privacy
    assert policy.ledger is not None
    ledger = PrivacyLedger(policy.ledger)
    entries = ledger.entries()
    spent = ledger.spent(policy.delta, policy.accountant)
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        runs[entry.run_id].append(asdict(entry))
    audit = None
    if site.audit_log.is_file():
        check = check_chain(site.audit_log)
        typed = read_entries(check)
        statuses: dict[str, int] = defaultdict(int)
        for _, entry in typed.of(SiteEntry):
            statuses[entry.status] += 1
        audit = {**check.summary(), "problems": [str(p) for p in [*check.problems, *typed.problems]],
                 "statuses": dict(sorted(statuses.items()))}
        audit["ok"] = not audit["problems"]
    return {"site": site.name, "ledger": str(policy.ledger), "policy": policy.model_dump(mode="json"),
            "budget": policy.epsilon, "spent": spent, "remaining": max(policy.epsilon - spent, 0.0),
            "fraction": min(spent / policy.epsilon, 1.0), "over": spent > policy.epsilon,
            "replace_one": replace_one_epsilon([(e.noise_multiplier, 1) for e in entries], policy.delta,
                                               policy.accountant),
            "entries": [asdict(e) for e in entries],
            "runs": [{"run_id": run, "epsilon": rows[0]["epsilon_run"], "delta": rows[0]["delta"],
                      "releases": [r["release"] for r in rows], "images": max(r["images"] for r in rows)}
                     for run, rows in runs.items()],
            "audit": audit, "audit_path": str(site.audit_log)}


def site_page(site: SiteConfig) -> str:
    return render("site.html.j2", view=site_view(site))


def write_site_page(site: SiteConfig, output: Path) -> None:
    """The page, written atomically; a file tba-fed did not write (no report.html of its own) is never replaced."""
    from ..errors import TBAInputError
    from ..fileio import atomic_write

    output = Path(output)
    if output.is_dir():
        raise TBAInputError("--html", f"{output} is a directory", "give a file name, e.g. site-report.html")
    if output.suffix.lower() not in (".html", ".htm"):
        raise TBAInputError("--html", f"{output} is not an .html file", "give a file name ending in .html")
    if output.exists() and b'name="generator" content="tba-fed' not in output.read_bytes()[:2048]:
        raise TBAInputError("--html", f"{output} exists and is not a report tba-fed wrote; it is left as it is",
                            "choose a new file name")
    html = site_page(site)
    try:
        atomic_write(output, lambda tmp: tmp.write_text(html))
    except OSError as err:
        raise TBAInputError("--html", f"{output} cannot be written ({err.strerror or err})",
                            "choose a path in a directory you can write") from None
