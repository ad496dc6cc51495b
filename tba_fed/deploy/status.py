"""``tba-fed status RUN.yaml|SITE.yaml``: how the deployment is doing now, one line per check like preflight.

At the coordinator (a run YAML): the SuperLink answers TLS, each listed site is registered and connected
(enough of them for ``min_sites``), no stranger's key is registered, the runs the SuperLink knows and their
states, and the server's audit log verified to its last head. At a site (a site YAML): the SuperLink answers,
this site's key is registered and its SuperNode connected, the runs, ε spent and left from the site's own
ledger, and its audit log verified. Only PROBLEM lines make the exit code 1; unlike preflight nothing here
probes the SuperLink's node authentication (that probe is logged as an error at the SuperLink every time).
"""

from __future__ import annotations

from pathlib import Path

import httpx

from ..audit import check_chain
from ..config import read_yaml, validate
from ..errors import TBAInputError
from ..federation.audit_check import read_entries
from ..federation.config import FederatedRunConfig, SiteConfig
from . import certificates as certs
from .checks import Check, from_error, listed_nodes, note, ok, problem, stranger
from .flower_control import Node, SuperLinkAPIError, registered_nodes, runs
from .preflight import budget_check
from .profile import run_errors, site_errors

RECENT_RUNS = 5
ONLINE = "online"


def status(path: Path) -> list[Check]:
    """Every check for the YAML at `path` (a site YAML has ``name``, a run YAML has none)."""
    try:
        raw = read_yaml(Path(path))
        config = validate(SiteConfig if "name" in raw else FederatedRunConfig, raw)
    except TBAInputError as err:
        return [from_error(err)]
    if isinstance(config, SiteConfig):
        return site_status(config)
    return server_status(config)


def server_status(config: FederatedRunConfig) -> list[Check]:
    results = [from_error(err) for err in run_errors(config)]
    sl = config.superlink
    if sl is not None and sl.certificates is not None:
        ca = sl.certificates.ca_certfile
        reach = _reachable(sl.fleet_address, ca)
        results.append(reach)
        if not reach.problem:
            results += _sites(sl.fleet_address, ca, sl.sites, config.federation.num_sites, config.federation.min_sites)
            results += _runs(sl.fleet_address, ca)
    elif sl is not None:
        results.append(note("superlink", "not checked: without superlink.certificates there is no CA to verify it "
                                         "against (development only)"))
    results.append(note("privacy", "ε spent and left are each site's own: its ledger, which only that site reads",
                        "ask each site for tba-fed status SITE.yaml"))
    results.append(audit_check("audit", config.audit_log))
    return results


def site_status(site: SiteConfig) -> list[Check]:
    results = [from_error(err) for err in site_errors(site)]
    conn = site.connection
    if conn is not None and conn.root_certificates is not None:
        reach = _reachable(conn.superlink, conn.root_certificates, "connection.superlink")
        results.append(reach)
        if not reach.problem and conn.auth_key is not None:
            results.append(_own_node(site.name, conn.superlink, conn.root_certificates, Path(f"{conn.auth_key}.pub")))
            results += _runs(conn.superlink, conn.root_certificates)
    elif conn is not None:
        results.append(note("connection.superlink", "not checked: without connection.root_certificates there is no "
                                                     "CA to verify it against (development only)"))
    results.append(budget_check(site))
    results.append(audit_check("audit", site.audit_log))
    return results


def _reachable(address: str, ca: Path, field: str = "superlink") -> Check:
    try:
        version = certs.tls_handshake(address, certs.tls_context(ca, field), timeout=5.0)
    except TBAInputError as err:
        return from_error(err)
    except OSError as err:
        return problem(field, f"the SuperLink at {address} does not answer ({certs.describe_os_error(err)})",
                       "start it (systemctl start tba-fed-superlink, or tba-fed superlink RUN.yaml); check the "
                       "address and the firewall")
    return ok(field, f"{address} answers ({version}, verified against {ca})")


def _nodes(address: str, ca: Path) -> list[Node] | Check:
    try:
        return registered_nodes(address, ca)
    except (SuperLinkAPIError, httpx.HTTPError, OSError) as err:
        return problem("superlink", f"cannot list the SuperNodes at {address} ({err})",
                       "check the SuperLink's log; restart it if it does not answer")


def _sites(address: str, ca: Path, sites: dict[str, Path], num_sites: int, min_sites: int) -> list[Check]:
    """One line per listed site (registered? connected?), strangers' keys, and whether enough sites are online."""
    nodes = _nodes(address, ca)
    if isinstance(nodes, Check):
        return [nodes]
    matched, strangers = listed_nodes(nodes, {name: (f"superlink.sites.{name}", path) for name, path in sites.items()})
    results, online = [], 0
    for name, node in matched.items():
        field = f"superlink.sites.{name}"
        if isinstance(node, Check):
            results.append(node)
        elif node is None:
            results.append(problem(field, f"{name}'s key ({sites[name]}) is not registered",
                                   "restart tba-fed superlink (it registers every key under superlink.sites)"))
        elif node.status == ONLINE:
            online += 1
            results.append(ok(field, f"{name}: node {node.node_id}, registered and connected"))
        else:
            results.append(note(field, f"{name}: node {node.node_id}, registered, {node.status}: its SuperNode is not "
                                       "connected", f"ask {name} to start it (tba-fed supernode SITE.yaml) and run "
                                                    "tba-fed status there"))
    results += [stranger(node) for node in strangers]
    summary = (f"{online} of {len(sites)} listed sites connected; a run waits for num_sites {num_sites} and completes "
               f"with min_sites {min_sites}")
    if online < min_sites:
        results.append(problem("federation", summary + ": a run now would fail", "start the sites' SuperNodes"))
    else:
        results.append((ok if online >= num_sites else note)("federation", summary))
    return results


def _own_node(name: str, address: str, ca: Path, public_key: Path) -> Check:
    field = "connection.auth_key"
    nodes = _nodes(address, ca)
    if isinstance(nodes, Check):
        return nodes
    node = listed_nodes(nodes, {name: (field, public_key)})[0][name]
    if isinstance(node, Check):
        return node
    if node is None:
        return problem(field, f"{name}'s key ({public_key}) is not registered at {address}",
                       f"send {public_key} to the coordinator, who lists it under superlink.sites")
    if node.status != ONLINE:
        return problem(field, f"{name} is registered as node {node.node_id} but its SuperNode is {node.status}",
                       "start it (systemctl start tba-fed-supernode, or tba-fed supernode SITE.yaml) and read its log")
    return ok(field, f"{name}: node {node.node_id}, registered and connected")


def _runs(address: str, ca: Path) -> list[Check]:
    """The most recent runs and their states; a failed run is noted, not a problem of the deployment now."""
    try:
        found = runs(address, ca)
    except (SuperLinkAPIError, httpx.HTTPError, OSError) as err:
        return [problem("runs", f"cannot list the runs at {address} ({err})", "check the SuperLink's log")]
    if not found:
        return [note("runs", "none yet")]
    results = []
    for run in found[-RECENT_RUNS:]:
        details = f" ({run.details})" if run.details else ""
        line = f"run {run.run_id}: {run.status}{details}, submitted {run.pending_at}"
        results.append(note("runs", line) if run.status.endswith(("failed", "stopped")) else ok("runs", line))
    if len(found) > RECENT_RUNS:
        results.append(note("runs", f"{len(found) - RECENT_RUNS} older runs not shown", "flwr ls <connection>"))
    return results


def audit_check(field: str, log: Path) -> Check:
    """The hash chain verified from its first entry to its head (what ``tba-fed audit verify`` checks alone)."""
    if not Path(log).exists():
        return note(field, f"{log} does not exist yet: no request served")
    try:
        check = check_chain(log)
    except TBAInputError as err:
        return from_error(err)
    found = [*check.problems, *read_entries(check).problems]
    if found:
        return problem(field, f"{log}: {len(found)} problem(s), first: {found[0]}",
                       f"tba-fed audit verify {log} names each; keep the log as it is")
    return ok(field, f"{log}: {len(check.entries)} entries, chain intact; head {check.head}")
