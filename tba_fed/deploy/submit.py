"""``tba-fed submit RUN.yaml``: start a deployed run from its YAML, follow it, and judge it.

The run YAML is validated with the loader the ServerApp uses and its profile's requirements checked
(``profile.require_run``) before anything is written or sent; the SuperLink connection comes from its
``superlink`` section and is added as ``tba-fed connect`` adds it (``flower_connection``: Flower 1.41 and 1.42
read connections only from their config file).
Then ``flwr run APP NAME --stream --run-config config-path=<absolute RUN.yaml>`` submits the app,
and its output is relayed line by line.

``flwr run``'s exit code does not say whether the run succeeded (a run lost with a gracefully stopped
SuperLink ends it with 0), so once the log stream ends the outcome is asked of the SuperLink
(``flwr ls --run-id``): success is ``finished:completed`` *and* a report.json in ``output`` written
after the submission. That is why submit runs on the coordinator's machine, where the ServerApp reads
the YAML and writes ``output``, and why ``output`` must be absolute (the ServerApp would resolve a
relative one against its own working directory). With ``--no-stream`` it returns once the run is
accepted, like ``flwr run`` without ``--stream``.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..errors import TBAInputError, TBARunError
from ..fileio import check_output_dir
from ..federation.config import load_federated_config
from .flower_connection import Connection, connect, describe_connection, run_connection
from .processes import app_directory, executable, flower_env, relayed, stop_process

_logger = logging.getLogger(__name__)

CONNECTION = "hospitals"
STARTED = re.compile(r"Successfully started run (\d+)")
COMPLETED = "finished:completed"


class SubmitError(TBARunError):
    """The run was not started, or did not complete with a new report (its log was relayed above)."""


@dataclass(frozen=True)
class Submission:
    """What ``tba-fed submit`` writes and runs for one run YAML."""

    config_path: Path           # absolute: the ServerApp reads it
    output: Path                # where the ServerApp writes report.json
    link: Connection            # the SuperLink as a Flower connection (tba-fed connect)
    command: list[str]
    stream: bool


def plan_submission(config_path: Path, *, connection: str = CONNECTION, stream: bool = True) -> Submission:
    """Validate the run YAML and decide what to write and run; writes nothing. Bad input raises TBAInputError."""
    config_path = Path(config_path).resolve()
    config = load_federated_config(config_path)
    link = run_connection(config, connection)
    if not config.output.is_absolute():
        raise TBAInputError("output", f"{config.output} is relative: the ServerApp would resolve it against its own "
                                      "working directory, not this one", "give an absolute path, e.g. "
                                                                         "/srv/tba-fed/server-out")
    check_output_dir(config.output, kind="compressed", overwrite=config.overwrite)  # refused now, not after sites spent budget
    app = app_directory()
    command = [executable("flwr"), "run", str(app), link.name, *(["--stream"] if stream else []),
               "--run-config", f"config-path={json.dumps(str(config_path))}"]
    return Submission(config_path, config.output, link, command, stream)


def describe(sub: Submission) -> str:
    """What `submit` would write and run (``--print``)."""
    return f"{describe_connection(sub.link)}\n\n{shlex.join(sub.command)}"


def _relay(sub: Submission, out: TextIO, tracebacks: bool) -> tuple[int, int | None]:
    """Run `flwr run`, copying its output to `out` as it comes (each traceback cut to its exception's line unless
    `tracebacks`); its exit code and the run id it printed."""
    env = {**flower_env(), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(sub.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_id = None
    try:
        assert process.stdout is not None
        for line in relayed(process.stdout, tracebacks):
            out.write(line)
            out.flush()
            if run_id is None and (found := STARTED.search(line)):
                run_id = int(found.group(1))
        return process.wait(), run_id
    finally:
        if process.poll() is None:  # interrupted: stop following; the run itself goes on at the SuperLink
            stop_process(process)
            if run_id is not None:
                _logger.warning("stopped following run %d; it goes on at the SuperLink (flwr stop %d %s ends it)",
                                run_id, run_id, sub.link.name)


def run_status(sub: Submission, run_id: int) -> tuple[str, str]:
    """The run's status and its details as the SuperLink reports them (``flwr ls --run-id``)."""
    done = subprocess.run([executable("flwr"), "ls", "--run-id", str(run_id), sub.link.name, "--format", "json"],
                          env=flower_env(), capture_output=True, text=True, timeout=120, check=False)
    try:
        run = json.loads(done.stdout)["runs"][0]
        return str(run["status"]), str(run.get("status-details", ""))
    except (ValueError, KeyError, IndexError, TypeError):
        raise SubmitError(f"could not ask the SuperLink for run {run_id}'s status (flwr ls exit code {done.returncode}: "
                          f"{(done.stdout + done.stderr).strip()[-500:]}); judge it by {sub.output}/report.json "
                          f"and flwr ls {sub.link.name}") from None


def submit(sub: Submission, out: TextIO, tracebacks: bool = False) -> int:
    """Add the connection if missing, submit the run and, when streaming, follow it to its end; 0 only if the
    SuperLink reports it completed and it wrote a new report. Raises SubmitError otherwise."""
    connect(sub.link)
    started = time.time()
    code, run_id = _relay(sub, out, tracebacks)
    if run_id is None:
        raise SubmitError(f"flwr run did not start the run (exit code {code}); see its output above")
    follow = f"flwr log {run_id} {sub.link.name} --stream; flwr ls --run-id {run_id} {sub.link.name}"
    if not sub.stream:
        _logger.info("run %d submitted; follow it: %s; its result: %s/report.json", run_id, follow, sub.output)
        return 0
    status, details = run_status(sub, run_id)
    if status != COMPLETED:
        ended = "" if status.startswith("finished") else " (the log stream ended before the run did; follow it: " \
                                                         f"{follow})"
        raise SubmitError(f"run {run_id} is {status}" + (f": {details}" if details not in ("", "N/A") else "") + ended)
    report = sub.output / "report.json"
    if not report.is_file() or report.stat().st_mtime < started:
        raise SubmitError(f"run {run_id} is {status} but wrote no new {report}")
    _logger.info("run %d completed; report in %s", run_id, report)
    return 0
