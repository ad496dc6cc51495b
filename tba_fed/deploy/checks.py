"""Checks of a deployment's security set-up, each a one-line result (OK / PROBLEM with its fix / NOTE).

Shared by ``tba-fed preflight`` (which prints every result) and the production ServerApp (which
refuses to run on the first problem). Nothing here trusts how a process was launched: the
SuperLink is asked over the network what it actually does.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx

from ..errors import TBAInputError
from ..fileio import writable_location
from . import certificates as certs
from ..federation.config import SuperLinkConfig
from ..federation.flower_internals import database_node_ids, public_key_to_bytes
from .flower_control import Node, SuperLinkAPIError, accepts_unregistered_nodes, registered_nodes

Status = Literal["OK", "PROBLEM", "NOTE"]
RESTART = "start the SuperLink with tba-fed superlink RUN.yaml"


@dataclass(frozen=True)
class Check:
    """One checked item: PROBLEM fails a preflight, NOTE is printed but does not."""

    field: str
    status: Status
    message: str
    fix: str | None = None

    def line(self) -> str:
        return f"{self.status:<7} {self.field}: {self.message}" + (f" (fix: {self.fix})" if self.fix else "")

    @property
    def problem(self) -> bool:
        return self.status == "PROBLEM"


def ok(field: str, message: str) -> Check:
    return Check(field, "OK", message)


def note(field: str, message: str, fix: str | None = None) -> Check:
    return Check(field, "NOTE", message, fix)


def problem(field: str, message: str, fix: str | None = None) -> Check:
    return Check(field, "PROBLEM", message, fix)


def from_error(err: TBAInputError, status: Status = "PROBLEM") -> Check:
    return Check(err.field, status, err.message, err.fix)


def problems(checks: Iterable[Check]) -> list[Check]:
    return [c for c in checks if c.problem]


def certificate_check(field: str, path: Path, expiry_days: float, *, ca_certfile: Path | None = None,
                      host: str | None = None, must_be_ca: bool = False) -> list[Check]:
    """A PEM certificate: readable, valid now and for `expiry_days` more, a CA or issued by `ca_certfile`,
    and covering `host` (the name the sites connect to)."""
    try:
        cert = certs.load_certificate(path, field)
    except TBAInputError as err:
        return [from_error(err)]
    found = []
    if (err := certs.validity_error(cert, path, field, expiry_days)) is not None:
        found.append(from_error(err))
    details = []
    if must_be_ca:
        if not certs.is_ca(cert):
            found.append(problem(field, f"{path} is not a CA certificate (no CA:TRUE basic constraint)",
                                 f"give the ca.crt {certs.MAKE_CERTIFICATES} wrote"))
    elif ca_certfile is not None:
        with contextlib.suppress(TBAInputError):
            if not certs.issued_by(cert, certs.load_certificate(ca_certfile, field)):
                found.append(problem(field, f"{path} was not issued by the CA {ca_certfile}",
                                     f"issue it with that CA ({certs.MAKE_CERTIFICATES})"))
            else:
                details.append("issued by the CA")
    if host is not None:
        if certs.covers_host(cert, host):
            details.append(f"covers {host}")
        else:
            found.append(problem(field, f"{path} does not cover {host} (not in its subjectAltName): sites connecting "
                                        f"to {host} will reject it",
                                 f"issue it for {host}: {certs.MAKE_CERTIFICATES} DIR {host} ..."))
    if found:
        return found
    left = int(certs.days_left(cert))
    return [ok(field, ", ".join([f"{path} valid until {cert.not_valid_after_utc:%Y-%m-%d} ({left} days)", *details]))]


def server_key_check(field: str, keyfile: Path, certfile: Path) -> Check:
    try:
        matches = certs.key_matches_certificate(keyfile, certs.load_certificate(certfile, field), field)
    except TBAInputError as err:
        return from_error(err)
    if not matches:
        return problem(field, f"{keyfile} is not the key of {certfile}", "give the key the certificate was issued for")
    return ok(field, f"{keyfile} matches {certfile}")


def auth_key_check(field: str, path: Path) -> Check:
    """A SuperNode's key pair: OpenSSH EC private key on a NIST curve, with the matching .pub beside it."""
    try:
        key = certs.load_auth_private_key(path, field)
        public = certs.load_auth_public_key(pub := Path(f"{path}.pub"), field)
    except TBAInputError as err:
        return from_error(err)
    if public_key_to_bytes(public) != public_key_to_bytes(key.public_key()):
        return problem(field, f"{pub} does not match {path}",
                       "put the .pub generated with this key beside it; the SuperLink must register that one")
    return ok(field, f"{path}: EC {key.curve.name} key in OpenSSH format, {pub.name} matches")


def writable_directory(field: str, path: Path) -> Check:
    """Whether files can be created in `path` (or, if it does not exist yet, in its nearest existing
    parent, where it will be created)."""
    try:
        existing = writable_location(path, field)
    except TBAInputError as err:
        return from_error(err)
    return ok(field, f"{path} is writable" + ("" if existing == Path(path) else f" (will be created in {existing})"))


def reachable(field: str, address: str, ca_certfile: Path) -> Check:
    """TCP connect and a TLS handshake verified against the CA, to the address sites use."""
    try:
        version = certs.tls_handshake(address, certs.tls_context(ca_certfile, field))
    except TBAInputError as err:
        return from_error(err)
    except OSError as err:
        return problem(field, f"cannot reach {address} over TLS ({certs.describe_os_error(err)})",
                       "check the SuperLink runs (tba-fed superlink RUN.yaml), the address, the firewall and the CA")
    return ok(field, f"{address} reachable, {version} handshake verified against {ca_certfile}")


def listed_nodes(nodes: Sequence[Node], keys: Mapping[str, tuple[str, Path]]
                 ) -> tuple[dict[str, Node | Check | None], list[Node]]:
    """Each listed public key (name -> (field, .pub path)) matched to its registered node (None: not registered;
    a PROBLEM Check: the key cannot be read), in the order listed; and the registered nodes whose key is not listed
    (strangers)."""
    known = {node.public_key: node for node in nodes}
    matched: dict[str, Node | Check | None] = {}
    listed = set()
    for name, (field, path) in keys.items():
        try:
            key = public_key_to_bytes(certs.load_auth_public_key(path, field))
        except TBAInputError as err:
            matched[name] = from_error(err)
            continue
        listed.add(key)
        matched[name] = known.get(key)
    return matched, [node for node in nodes if node.public_key not in listed]


def stranger(node: Node) -> Check:
    """A registered key nobody listed: a site that should no longer connect, or a key registered by hand."""
    return problem("superlink.sites", f"node {node.node_id} ({node.name or 'no name'}) is registered but its key is not "
                                      "under superlink.sites",
                   f"flwr supernode unregister {node.node_id} <connection>, or list its key")


def registration_checks(address: str, ca_certfile: Path, keys: Mapping[str, tuple[str, Path]], *,
                        complete: bool = False) -> list[Check]:
    """Whether each public key (name -> (field, .pub path)) is registered at the SuperLink; with `complete`,
    a registered key that is not listed is a problem too (a site that should no longer connect)."""
    try:
        nodes = registered_nodes(address, ca_certfile)
    except (SuperLinkAPIError, httpx.HTTPError, OSError) as err:
        return [problem("superlink", f"cannot list the registered SuperNodes at {address} ({err})", RESTART)]
    matched, strangers = listed_nodes(nodes, keys)
    found = []
    for name, node in matched.items():
        field, path = keys[name]
        if isinstance(node, Check):
            found.append(node)
        elif node is None:
            found.append(problem(field, f"the key of {name} ({path}) is not registered at {address}",
                                 f"flwr supernode register {path} <connection>, or restart tba-fed superlink, which "
                                 "registers every key under superlink.sites"))
        else:
            found.append(ok(field, f"{name} registered as node {node.node_id} ({node.status})"))
    return found + ([stranger(node) for node in strangers] if complete else [])


def live_superlink_checks(superlink: SuperLinkConfig) -> list[Check]:
    """What the running SuperLink actually does: TLS with the configured CA, SuperNode authentication,
    and its state in the configured database file."""
    if superlink.certificates is None:
        return [problem("superlink.certificates", "no CA certificate to verify the SuperLink's TLS against",
                        "set superlink.certificates")]
    ca = superlink.certificates.ca_certfile
    address = superlink.fleet_address
    tls = reachable("superlink.certificates", address, ca)
    if tls.problem:
        return [tls]
    try:
        open_registration = accepts_unregistered_nodes(address, ca)
    except (SuperLinkAPIError, httpx.HTTPError, OSError) as err:
        return [tls, problem("superlink.node_auth", f"cannot ask {address} whether it authenticates SuperNodes ({err})",
                             RESTART)]
    node_auth = (problem("superlink.node_auth", f"the SuperLink at {address} lets unregistered SuperNodes register "
                                                "(started without --enable-supernode-auth)", RESTART)
                 if open_registration else ok("superlink.node_auth", f"{address} refuses unregistered SuperNodes"))
    return [tls, node_auth, database_check(superlink, address, ca)]


def database_check(superlink: SuperLinkConfig, address: str, ca_certfile: Path) -> Check:
    """The configured database file exists and holds the nodes the running SuperLink reports: a SuperLink
    started with another database (or in memory) fails this."""
    path = superlink.database
    if path is None:
        return problem("superlink.database", "not set: the SuperLink state would live in memory", "set superlink.database")
    if not Path(path).is_file():
        return problem("superlink.database", f"{path} does not exist: the SuperLink at {address} does not keep its "
                                             "state there", RESTART)
    try:
        stored = database_node_ids(path)
        reported = {node.node_id for node in registered_nodes(address, ca_certfile)}
    except (ValueError, OSError, SuperLinkAPIError, httpx.HTTPError) as err:
        return problem("superlink.database", f"{path} cannot be checked against the running SuperLink ({err})", RESTART)
    if missing := sorted(reported - stored):
        return problem("superlink.database", f"{path} does not hold nodes {missing} the SuperLink at {address} reports: "
                                             "it runs on another database", RESTART)
    return ok("superlink.database", f"{path} holds the SuperLink's state ({len(reported)} registered nodes)")


def public_key_check(field: str, path: Path) -> Check:
    try:
        key = certs.load_auth_public_key(path, field)
    except TBAInputError as err:
        return from_error(err)
    return ok(field, f"{path}: EC {key.curve.name} public key in OpenSSH format")


def port_check(superlink: SuperLinkConfig) -> tuple[Check, bool]:
    """The SuperLink's port is free to bind, or already served by a SuperLink speaking TLS with the
    configured CA at the address sites use. Returns the check and whether a SuperLink is running."""
    field, where = "superlink.port", f"{superlink.host}:{superlink.port}"
    try:
        with socket.socket(socket.AF_INET6 if ":" in superlink.host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((superlink.host, superlink.port))
        return ok(field, f"{where} is free to bind"), False
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            return problem(field, f"cannot bind {where} ({err.strerror})", "choose a host and port this machine has"), False
    if superlink.certificates is None:
        return problem(field, f"{where} is in use", "stop what holds it or choose another port"), False
    tls = reachable(field, superlink.fleet_address, superlink.certificates.ca_certfile)
    if tls.problem:
        return problem(field, f"{where} is in use, and {superlink.fleet_address} does not answer a TLS handshake "
                              "verified by the CA", "stop what holds the port or choose another one"), False
    return ok(field, f"{where} is served by a SuperLink: {tls.message}"), True
