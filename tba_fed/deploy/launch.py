"""``tba-fed superlink`` / ``tba-fed supernode``: Flower's processes started from the YAML that describes them.

The command line is built from the run's ``superlink`` section or the site's ``connection`` section,
so what runs is what the YAML (and preflight) says: in production no command is built without TLS,
SuperNode authentication and a database, and ``--insecure`` exists only in development. The process
runs in the foreground; SIGINT/SIGTERM are forwarded to it and its exit code is returned.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from pathlib import Path

from ..errors import TBAInputError, TBARunError
from ..privacy.site_state import open_state
from .certificates import describe_os_error, load_auth_public_key, tls_context, tls_handshake
from ..federation.config import FederatedRunConfig, SiteConfig, TLSFiles
from ..federation.flower_internals import public_key_to_bytes
from .flower_control import SuperLinkAPIError, register_node, registered_nodes
from .profile import require_site, require_run
from .processes import executable, flower_env, stop_process, superlink_args

_logger = logging.getLogger(__name__)


class LaunchError(TBARunError):
    """The Flower process did not come up as the YAML describes (it was stopped)."""


def superlink_command(config: FederatedRunConfig) -> list[str]:
    """flower-superlink's arguments for this run YAML (its profile's requirements checked first)."""
    sl = require_run(config)  # development only can have no certificates (--insecure)
    tls = None if sl.certificates is None else TLSFiles(**{name: path.resolve() for name, path in sl.certificates})
    return superlink_args(host=sl.host, port=sl.port, certificates=tls, node_auth=sl.node_auth,
                          database=sl.database.resolve() if sl.database is not None else None)


def supernode_command(site: SiteConfig, site_yaml: Path) -> list[str]:
    """flower-supernode's arguments for this site YAML; the SuperNode hands the YAML's path to the ClientApp."""
    conn = require_site(site)
    args = [executable("flower-supernode"), "--superlink", conn.superlink]
    if conn.root_certificates is None:
        args.append("--insecure")  # development only: require_site refuses this in production
    else:
        args += ["--root-certificates", str(conn.root_certificates.resolve())]
    if conn.auth_key is not None:
        args += ["--auth-supernode-private-key", str(conn.auth_key.resolve())]
    if conn.port is not None:
        args += ["--port", str(conn.port)]
    return [*args, "--node-config", f'site-config="{Path(site_yaml).resolve()}"']


def wait_for_tls(process: subprocess.Popen, address: str, ca_certfile: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    context = tls_context(ca_certfile, "superlink.certificates.ca_certfile")
    while True:
        try:
            tls_handshake(address, context, timeout=2.0)
            return
        except OSError as err:
            if process.poll() is not None:
                raise LaunchError(f"flower-superlink exited with code {process.returncode} before serving {address}") \
                    from None
            if time.monotonic() > deadline:
                raise LaunchError(f"flower-superlink did not serve TLS at {address} within {timeout:.0f} s "
                                   f"({describe_os_error(err)})") from None
            time.sleep(0.5)


def register_sites(config: FederatedRunConfig) -> dict[str, int]:
    """Register every key under ``superlink.sites`` the SuperLink does not know yet; returns name -> node id.
    A key registered before (the database keeps them) is left as it is."""
    sl = config.superlink
    if sl is None or not sl.sites:
        return {}
    if sl.certificates is None:
        raise TBAInputError("superlink.sites", "registering site keys needs TLS", "set superlink.certificates")
    ca = sl.certificates.ca_certfile
    known = {node.public_key: node.node_id for node in registered_nodes(sl.fleet_address, ca)}
    registered = {}
    for name, path in sl.sites.items():
        key = load_auth_public_key(path, f"superlink.sites.{name}")
        if public_key_to_bytes(key) in known:
            registered[name] = known[public_key_to_bytes(key)]
            continue
        registered[name] = register_node(sl.fleet_address, ca, key, name)
        _logger.info("registered %s (%s) as node %d", name, path, registered[name])
    return registered


def run_foreground(args: list[str], *, ready=None) -> int:
    """Run a Flower process until it exits, forwarding SIGINT and SIGTERM; `ready(process)` runs once it
    started (an error there stops the process). Returns the process's exit code."""
    _logger.info("starting: %s", " ".join(args))
    process = subprocess.Popen(args, env=flower_env())
    forwarded = {sig: signal.signal(sig, lambda number, _frame: process.send_signal(number))
                 for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if ready is not None:
            ready(process)
        return process.wait()
    except BaseException:
        stop_process(process)
        raise
    finally:
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)


def run_superlink(config: FederatedRunConfig) -> int:
    """Start flower-superlink as the run YAML describes, then register the sites' keys."""
    args = superlink_command(config)
    sl = config.superlink
    assert sl is not None

    def ready(process: subprocess.Popen) -> None:
        if sl.certificates is None:
            return
        wait_for_tls(process, sl.fleet_address, sl.certificates.ca_certfile)
        try:
            nodes = register_sites(config)
        except SuperLinkAPIError as err:
            raise LaunchError(f"registering the sites' keys failed: {err}") from None
        _logger.info("SuperLink serving %s; registered sites: %s", sl.fleet_address,
                     ", ".join(f"{name} (node {node})" for name, node in nodes.items()) or "none")

    return run_foreground(args, ready=ready)


def run_supernode(site: SiteConfig, site_yaml: Path) -> int:
    """flower-supernode in the foreground, once the site's state is in place (it would refuse every release)."""
    if site.state is not None:
        assert site.privacy.ledger is not None
        open_state(site.state, site.name, site.privacy.ledger)
    return run_foreground(supernode_command(site, site_yaml))
