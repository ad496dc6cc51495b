"""Flower's processes as tba-fed starts them: where the app and Flower's executables are, the environment they
run in, the one flower-superlink command line, a SuperLink on loopback, stopping what we started, and logs
with their tracebacks cut to the exceptions' lines."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import TBAInputError, TBARunError, one_line, strip_escapes
from ..federation.config import TLSFiles
from ..logs import NOISE, VERBOSE_ENV, formatter, verbose_env

TRACEBACK = "Traceback (most recent call last):"
QUOTED = ("The above exception was the direct cause", "During handling of the above exception", "ray::")
RAY_TRACEBACK = re.compile(r"^(?:\S.*:\s+)?ray::[\w.]+\(\) \(pid=")  # Ray's header of a task's traceback
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(\([\w.]*\))?:( |$)|Exception \w+ occurred)")
ACTOR = re.compile(r"^\(\w+ pid=\d+[^)]*\) ")  # Ray's prefix of a line a simulated site's process wrote
# Flower's console format: the level, a timestamp only at FLWR_LOG_LEVEL=DEBUG, a colon and the message
FLOWER_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) ?(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)?\s*: ?(.*)$")
LIBRARY_WARNING = re.compile(r"^\S+:\d+: (?:FutureWarning|DeprecationWarning): ")  # Python's warning line
# `flwr run`'s own plain lines: the run id is what an operator needs (flwr ls, stop, status); the rest is chatter
STARTED_RUN = "Successfully started run "
FLOWER_CLI_NOISE = ("Using SuperLink:", "Successfully installed ", "Successfully built ", "Loading project configuration")
# a line of Ray's own daemons (only warnings and errors reach a driver's output), with the header some carry:
# "(raylet) [2026-12-03 13:31:50,123 W 123 456] (raylet) file_system_monitor.cc:111: ... is over 95% full"
RAY_DAEMON = re.compile(r"^\((?:raylet|gcs_server|autoscaler|monitor|dashboard)[^)]*\) (?:\[[^\]]*\] )?(?:\(raylet\) )?")


def app_directory() -> Path:
    """The Flower app (pyproject.toml with [tool.flwr.app], clients/, server/): tba-fed's source tree."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        project = parent / "pyproject.toml"
        if project.is_file() and "[tool.flwr.app]" in project.read_text() and (parent / "clients").is_dir():
            return parent
    raise TBAInputError("app", "the Flower app (tba-fed's source tree with clients/ and server/) was not found",
                        "run from a clone of the tba-fed repository (pip install -e .)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_env(home: Path | None = None) -> dict[str, str]:
    """Environment for Flower's processes: this interpreter's bin first on PATH (the SuperLink starts
    flower-superexec and flwr-serverapp by name), no update check or telemetry, this process's verbosity for the
    apps' logging, every simulated site's lines (Ray would fold lines alike but for a number, such as two sites'
    refusals, into one), and a private FLWR_HOME if given."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {k: v for k, v in os.environ.items() if k != VERBOSE_ENV}
    env = {**env, "PATH": path, "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_DEDUP_LOGS": "0", **verbose_env()}
    return env if home is None else {**env, "FLWR_HOME": str(home)}


def executable(name: str) -> str:
    found = str(Path(sys.executable).with_name(name))
    if not Path(found).exists():
        found = shutil.which(name) or found
    if not Path(found).exists():
        raise TBAInputError("flwr", f"{name} not found", "install flwr[simulation] in this environment")
    return found


def superlink_args(*, port: int, certificates: TLSFiles | None, node_auth: bool, database: Path | None,
                   host: str | None = None, isolation: str | None = None, simulation: bool = False) -> list[str]:
    """flower-superlink's command line, written in this one place: from a run YAML (`launch.superlink_command`)
    and on loopback (`local_superlink`: simulations, tests, benchmarks). No certificates: ``--insecure``."""
    args = [executable("flower-superlink"), *(["--host", host] if host is not None else []), "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if certificates is None:
        args.append("--insecure")
    else:
        args += ["--ssl-certfile", str(certificates.certfile), "--ssl-keyfile", str(certificates.keyfile),
                 "--ssl-ca-certfile", str(certificates.ca_certfile)]
    if node_auth:
        args.append("--enable-supernode-auth")
    if database is not None:
        args += ["--database", str(database)]
    if isolation is not None:
        args += ["--isolation", isolation]
    return [*args, "--simulation"] if simulation else args


@contextlib.contextmanager
def local_superlink(home: Path, port: int, *, simulation: bool = False, certificates: Path | None = None,
                    node_auth: bool = False, isolation: str = "subprocess") -> Iterator[subprocess.Popen]:
    """A SuperLink on 127.0.0.1:port for the duration of the block, stopped by the pid we started.

    ``certificates``: a folder from scripts/make-certificates.sh (TLS); ``node_auth``: only registered
    SuperNode keys may connect (needs TLS); ``isolation="process"``: the ServerApp runs under a
    separately started flower-superexec instead of a child of the SuperLink.
    """
    tls = None if certificates is None else TLSFiles(certfile=certificates / "server.pem", keyfile=certificates / "server.key",
                                                     ca_certfile=certificates / "ca.crt")
    args = superlink_args(port=port, certificates=tls, node_auth=node_auth, database=home / "superlink.db",
                          isolation=isolation, simulation=simulation)
    log = open(home / "superlink.log", "w")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(args, env=flower_env(home), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60.0
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise TBARunError(f"flower-superlink did not start: "
                                      f"{one_line((home / 'superlink.log').read_text()[-2000:])}")
            time.sleep(0.3)
        yield process
    finally:
        stop_process(process)
        log.close()


def _ours(name: str, level: int, message: str) -> str:
    """`message` as a line of tba-fed's format, logged now by `name`."""
    record = logging.makeLogRecord({"name": name, "levelno": level, "levelname": logging.getLevelName(level),
                                    "msg": message})
    return formatter().format(record)


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def without_tracebacks(lines: Iterable[str]) -> Iterator[str]:
    """A log with each Python traceback in it (a chain of them, or one Ray quotes in its error) cut to the lines
    that name each exception and its message, after a note where the frames were: what failed stays readable,
    and ``tba-fed -v`` shows the frames."""
    inside = False  # from a traceback's first line until a line of the log's own
    for line in lines:
        plain = strip_escapes(line).strip()
        if TRACEBACK in plain or RAY_TRACEBACK.search(plain):
            if not inside:
                yield strip_escapes(line).split(TRACEBACK, 1)[0].split("ray::", 1)[0] \
                    + "(traceback left out; tba-fed -v shows it)\n"
            inside = True
        elif inside and (not plain or line[:1].isspace() or plain.startswith(QUOTED)):
            continue  # a frame, a chained cause's preamble, Ray's header of the traceback it quotes
        elif inside and EXCEPTION_LINE.match(plain):
            yield line  # what was raised, and its message
        else:
            inside = False
            yield line


def relayed(lines: Iterable[str], verbose: bool) -> Iterable[str]:
    """A Flower process's output as tba-fed relays it: as it is if `verbose`, else with tracebacks cut and
    Flower's chatter left out."""
    return lines if verbose else without_noise(without_tracebacks(lines))


def without_noise(lines: Iterable[str]) -> Iterator[str]:
    """A log with the lines of Flower's own format below WARNING and Flower's `NOISE` left out (with the indented
    lines that continue them) and its other lines rewritten in tba-fed's format, so the log has one format;
    `flwr run`'s plain lines left out but for the run it started, and Ray's daemons' warnings (raylet) rewritten in
    that format too; Python's FutureWarnings and DeprecationWarnings (Ray's at start-up), with the source line they
    quote, left out. Lines in tba-fed's format and other plain output pass as they are."""
    dropping = False  # inside a left-out message: its indented continuation lines go too
    for line in lines:
        plain = strip_escapes(line).rstrip("\n")
        prefix = found[0] if (found := ACTOR.match(plain)) else ""
        body = plain[len(prefix):]
        if flower := FLOWER_LINE.match(body):
            level, message = logging.getLevelName(flower[1]), flower[2].strip()
            dropping = level < logging.WARNING or not message or message.startswith(NOISE)
            if not dropping:
                yield f"{prefix}{_ours('flwr', level, message)}\n"
        elif body.startswith(STARTED_RUN):
            dropping = False
            yield f"{_ours('flwr', logging.INFO, body.strip())}\n"
        elif body.startswith(FLOWER_CLI_NOISE):
            dropping = False
        elif daemon := RAY_DAEMON.match(body):
            dropping = False
            yield f"{_ours('ray', logging.WARNING, body[daemon.end():].strip())}\n"
        elif LIBRARY_WARNING.match(body):
            dropping = True
        elif dropping and (not body.strip() or body[:1].isspace()):
            continue
        else:
            dropping = False
            yield line
