"""``tba-fed simulate``: the federated run in Flower's simulation engine on one machine.

Starts a private SuperLink in simulation mode on a free loopback port (its own FLWR_HOME, so nothing
of the user's Flower set-up is touched), submits the app with ``flwr run``, streams its logs, and
always stops the SuperLink it started. A simulation is the development profile (no TLS, no SuperNode
authentication, state in memory): it refuses a config that explicitly asks for production.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import numpy as np
import yaml
from torch import nn

from ..adapter import ViTAdapter
from ..config import check_device
from ..data import build_dataset
from ..errors import TBAInputError, TBARunError, one_line, strip_escapes
from ..fileio import check_output_dir
from ..models import create_model
from ..partition import log_histograms
from ..federation.config import FederatedRunConfig, fixed_plan, load_federated_config
from .profile import development_run
from ..federation.site import simulated_indices
from ..federation.site_context import simulated_site

_logger = logging.getLogger(__name__)
FEDERATION = "tba-fed-sim"
TRACEBACK = "Traceback (most recent call last):"
QUOTED = ("The above exception was the direct cause", "During handling of the above exception", "ray::")
RAY_TRACEBACK = re.compile(r"^(?:\S.*:\s+)?ray::[\w.]+\(\) \(pid=")  # Ray's header of a task's traceback
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(\([\w.]*\))?:( |$)|Exception \w+ occurred)")


class SimulationError(TBARunError):
    """The Flower run did not complete; the message says why, in one line."""


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
    flower-superexec and flwr-serverapp by name), no update check or telemetry, and a private FLWR_HOME if given."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    return env if home is None else {**env, "FLWR_HOME": str(home)}


def executable(name: str) -> str:
    found = str(Path(sys.executable).with_name(name))
    if not Path(found).exists():
        found = shutil.which(name) or found
    if not Path(found).exists():
        raise TBAInputError("flwr", f"{name} not found", "install flwr[simulation] in this environment")
    return found


@contextlib.contextmanager
def local_superlink(home: Path, port: int, *, simulation: bool = False, certificates: Path | None = None,
                    node_auth: bool = False, isolation: str = "subprocess",
                    timeout: float = 60.0) -> Iterator[subprocess.Popen]:
    """A SuperLink on 127.0.0.1:port for the duration of the block, stopped by the pid we started.

    ``certificates``: a folder from scripts/make-certificates.sh (TLS); ``node_auth``: only registered
    SuperNode keys may connect (needs TLS); ``isolation="process"``: the ServerApp runs under a
    separately started flower-superexec instead of a child of the SuperLink.
    """
    args = [executable("flower-superlink"), "--port", str(port), "--disable-runtime-dependency-installation",
            "--database", str(home / "superlink.db"), "--isolation", isolation]
    if certificates is None:
        args.append("--insecure")
    else:
        args += ["--ssl-certfile", str(certificates / "server.pem"), "--ssl-keyfile", str(certificates / "server.key"),
                 "--ssl-ca-certfile", str(certificates / "ca.crt")]
    if node_auth:
        args.append("--enable-supernode-auth")
    if simulation:
        args.append("--simulation")
    log = open(home / "superlink.log", "w")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(args, env=flower_env(home), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SimulationError(f"flower-superlink did not start: "
                                      f"{one_line((home / 'superlink.log').read_text()[-2000:])}")
            time.sleep(0.3)
        yield process
    finally:
        stop_process(process)
        log.close()


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate a process we started, killing it if it does not exit in time."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def absolute_paths(config: FederatedRunConfig) -> FederatedRunConfig:
    """Resolve relative paths against the caller's directory: Flower runs the apps elsewhere."""
    data = config.data.model_copy(update={"path": config.data.path.resolve() if config.data.path else None})
    checkpoint = config.model.checkpoint.resolve() if config.model.checkpoint else None
    model = config.model.model_copy(update={"checkpoint": checkpoint})
    return config.model_copy(update={"output": config.output.resolve(), "data": data, "model": model,
                                     "audit": config.audit.resolve() if config.audit else None})


def site_gpus(device: str, num_sites: int) -> float:
    """Simulated sites share the GPU (a fraction each, so they run side by side); none on the CPU."""
    return 0.0 if not device.startswith("cuda") else round(1.0 / num_sites, 4)


def log_site_histograms(config: FederatedRunConfig, model: nn.Module) -> str:
    """The class histogram of every simulated site (the same partition the sites will compute)."""
    dataset = build_dataset(config.data, model)
    targets = np.asarray(dataset.targets)
    p = config.federation.partition
    parts = [np.concatenate(simulated_indices(config.data, dataset, targets, config.federation.num_sites, site,
                                              p.scheme, alpha=p.alpha, shards_per_site=p.shards_per_site, seed=p.seed))
             for site in range(config.federation.num_sites)]
    return log_histograms(targets, parts, int(targets.max()) + 1)


def simulate(config_path: str | Path, *, timeout: float | None = None, out: TextIO | None = None,
             tracebacks: bool = False) -> tuple[dict, Path]:
    """Run the federation described by the YAML at `config_path`; return its report and output directory.
    Flower's log goes to `out` (None: this process's own output, as it is), with each traceback cut to its
    exception's line unless `tracebacks`."""
    # a bad config fails before anything starts; the resolved YAML handed to Flower says profile: development
    config = absolute_paths(development_run(load_federated_config(Path(config_path))))
    fed = config.federation
    check_device(config.device)  # the simulated sites' device is this machine's
    check_output_dir(config.output, kind="compressed", overwrite=config.overwrite)
    for site in range(fed.num_sites):  # where each simulated site installs the maps, beside the run's output
        check_output_dir(simulated_site(config, site)[1] / "compressed", kind="compressed", overwrite=True)
    model = create_model(config.model)
    fixed_plan(config, ViTAdapter(model).num_blocks)  # a bad plan fails here, not after the SuperLink started
    log_site_histograms(config, model)
    app = app_directory()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="tba-fed-flwr-") as tmp:
        home = Path(tmp)
        resolved = home / "run.yaml"
        resolved.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        port = free_port()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n')
        with local_superlink(home, port, simulation=True):
            resources = f"num-supernodes={fed.num_sites} client-resources-num-cpus={fed.cpus_per_site}"
            if gpus := site_gpus(config.device, fed.num_sites):
                resources += f" client-resources-num-gpus={gpus}"
            command = [executable("flwr"), "run", str(app), FEDERATION, "--stream", "--federation-config", resources,
                       "--run-config", f"config-path={json.dumps(str(resolved))}"]
            _logger.info("simulating %d sites: %s", fed.num_sites, " ".join(command))
            code = relay(command, env=flower_env(home), cwd=app, timeout=timeout or (fed.round_timeout * 4 + 300),
                         out=out, tracebacks=tracebacks)
            report_path = config.output / "report.json"
            if code != 0 or not report_path.is_file() or report_path.stat().st_mtime < started:
                reason = failure_details(home)  # asked while this simulation's SuperLink still runs
                raise SimulationError(f"the federated run failed: {reason}" if reason else
                                      f"the federated run failed (flwr exit code {code}) and wrote no new report in "
                                      f"{config.output}; Flower's log above says why")
    return json.loads(report_path.read_text()), config.output


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


def relay(command: list[str], *, env: dict[str, str], cwd: Path, timeout: float, out: TextIO | None,
          tracebacks: bool) -> int:
    """Run `command` to its end (stopped after `timeout` seconds), its output copied to `out` as it comes,
    tracebacks cut unless `tracebacks` (None: left on this process's own output); its exit code."""
    pipe = subprocess.PIPE if out is not None else None
    process = subprocess.Popen(command, env={**env, "PYTHONUNBUFFERED": "1"}, cwd=cwd, stdout=pipe,
                               stderr=subprocess.STDOUT if out is not None else None, text=True, errors="replace")
    expired = threading.Event()
    timer = threading.Timer(timeout, lambda: (expired.set(), process.kill()))
    timer.start()
    try:
        if out is not None:
            assert process.stdout is not None
            for line in process.stdout if tracebacks else without_tracebacks(process.stdout):
                out.write(line)
                out.flush()
        code = process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:
            stop_process(process)
    if expired.is_set():
        raise SimulationError(f"{Path(command[0]).name} did not finish within {timeout:.0f} s and was stopped")
    return code


def failure_details(home: Path) -> str | None:
    """Why the one run of this simulation's SuperLink failed, as the SuperLink recorded it (the exception the
    ServerApp ended with, e.g. a round's sites and their reasons), in one line; None if it cannot say."""
    done = subprocess.run([executable("flwr"), "ls", FEDERATION, "--format", "json"], env=flower_env(home),
                          capture_output=True, text=True, timeout=120, check=False)
    try:
        details = str(json.loads(done.stdout)["runs"][-1]["status-details"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    details = details.split("failed with exception: ", 1)[-1]  # Flower's prefix: "Simulation failed with exception: "
    return one_line(details, 2000) if details.strip() and details != "N/A" else None
