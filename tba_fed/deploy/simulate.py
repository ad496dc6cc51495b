"""``tba-fed simulate``: the federated run in Flower's simulation engine on one machine.

Starts a private SuperLink in simulation mode on a free loopback port (its own FLWR_HOME, so nothing
of the user's Flower set-up is touched), submits the app with ``flwr run``, streams its logs, and
always stops the SuperLink it started. A simulation is the development profile (no TLS, no SuperNode
authentication, state in memory): it refuses a config that explicitly asks for production.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TextIO

import numpy as np
import yaml
from torch import nn

from ..adapter import ViTAdapter
from ..config import check_device
from ..data import build_dataset
from ..errors import TBARunError, one_line
from ..fileio import check_output_dir
from ..models import create_model
from ..partition import log_histograms
from ..federation.config import FederatedRunConfig, fixed_plan, load_federated_config
from .processes import app_directory, executable, flower_env, free_port, local_superlink, relayed, stop_process
from .profile import development_run
from ..federation.site import simulated_indices
from ..federation.site_context import simulated_site

_logger = logging.getLogger(__name__)
FEDERATION = "tba-fed-sim"


class SimulationError(TBARunError):
    """The Flower run did not complete; the message says why, in one line."""


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
            for line in relayed(process.stdout, tracebacks):
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
