"""Logs that read like a product: one handler and one line format in every tba-fed process, Flower's and Ray's
chatter off by default and on with --verbose, Flower's relayed output cut the same way, and the server's word
while it waits for its sites."""

from __future__ import annotations

import io
import logging
import re
import time
import warnings

import pytest

import tba_fed.logs
from tba_fed.deploy.processes import relayed, without_noise
from tba_fed.federation import app_logging, delivery, rounds
from tba_fed.federation.delivery import RoundProgress, progress_line, replies_as_they_arrive
from tba_fed.logs import VERBOSE_ENV, configure, verbose_env

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


def _printing(name: str = "") -> list[logging.Handler]:
    """The handlers of logger `name` that print (pytest's own capture handlers aside)."""
    return [h for h in logging.getLogger(name).handlers if not type(h).__module__.startswith("_pytest")]


def _flower_logger() -> logging.Logger:
    from flwr.supercore.logger import FLOWER_LOGGER  # importing it attaches Flower's console handler

    return FLOWER_LOGGER


def _emit_everything() -> None:
    """What one ServerApp process logs on a normal run: tba-fed's lines, Flower's debug, info and shutdown
    warning, Ray's FutureWarning, and opacus's basicConfig when it is imported."""
    flower = _flower_logger()
    logging.basicConfig(format="%(asctime)s:%(levelname)s:%(message)s", datefmt="%m/%d/%Y %H:%M:%S")  # opacus
    logging.getLogger("tba_fed.federation.server").info("federation: 3 sites connected")
    flower.debug("Initialising: RayBackend")
    flower.info("Starting Flower ServerApp")
    flower.warning("Manually terminating %s", "ClientAppActor")
    flower.warning("a real warning")
    warnings.warn_explicit("Tip: In future versions of Ray, Ray will no longer override", FutureWarning,
                           "worker.py", 2051, module="ray._private.worker")


def test_one_handler_one_format_and_no_foreign_chatter_by_default():
    out = io.StringIO()
    _flower_logger()
    configure(False, out)
    assert len(_printing()) == 1
    for name in ("tba_fed", "flwr"):  # their records reach the one handler, once
        assert _printing(name) == [] and logging.getLogger(name).propagate
    _emit_everything()
    assert len(_printing()) == 1  # opacus's basicConfig found a handler and did nothing
    lines = out.getvalue().splitlines()
    assert [re.sub(f"^{STAMP} ", "", line) for line in lines] == [
        "INFO tba_fed.federation.server: federation: 3 sites connected", "WARNING flwr: a real warning"], lines
    assert all(re.match(f"{STAMP} ", line) for line in lines)


def test_verbose_shows_flowers_and_rays_lines_once_each():
    out = io.StringIO()
    configure(True, out)
    _emit_everything()
    text = out.getvalue()
    for line in ("DEBUG flwr: Initialising: RayBackend", "INFO flwr: Starting Flower ServerApp",
                 "WARNING flwr: Manually terminating ClientAppActor", "WARNING py.warnings: worker.py:2051: FutureWarning"):
        assert text.count(line) == 1, (line, text)
    assert text.count("federation: 3 sites connected") == 1


def test_flower_processes_inherit_the_verbosity(monkeypatch):
    configure(False, io.StringIO())
    assert verbose_env() == {}
    configure(True, io.StringIO())
    assert verbose_env() == {VERBOSE_ENV: "1"}
    monkeypatch.setenv(VERBOSE_ENV, "1")
    app_logging()  # what the ServerApp and ClientApp modules call when Flower loads them
    assert logging.getLogger().level == logging.DEBUG and len(_printing()) == 1
    monkeypatch.delenv(VERBOSE_ENV)
    app_logging()
    assert logging.getLogger().level == logging.INFO and len(_printing()) == 1


# Flower's output as `flwr run --stream` relays it (from a real simulation before this change; ESC as \x1b)
RELAYED = """\
2026-12-03 13:31:43,713 INFO tba_fed.deploy.simulate: simulating 3 sites
Using SuperLink: tba-fed-sim (127.0.0.1:56797)
Successfully started run 13383625095188243520
Successfully installed tba-fed to /tmp/tba-fed-flwr-7g12/apps/tba-fed.tba-fed.0.1.0.73212037.
\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `13383625095188243520`
\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.
\x1b[92mINFO \x1b[0m:      To change federation size, use the following command:
\x1b[92mINFO \x1b[0m:      \tflwr federation simulation-config @none/default <superlink> --num-supernodes <N>
/venv/lib/python3.11/site-packages/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray
  warnings.warn(
2026-12-03 13:31:58,001 INFO tba_fed.federation.server: federation: 3 sites connected
(ClientAppActor pid=4242) \x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor
(ClientAppActor pid=4242) \x1b[93mWARNING \x1b[0m:   Secure aggregation is slow
\x1b[33m(raylet)\x1b[0m [2026-12-03 13:32:01,002 E 4240 4240] (raylet) file_system_monitor.cc:116: /tmp/ray is over 95% full
\x1b[91mERROR \x1b[0m:     Exit Code: 201
An unhandled exception occurred in the ServerApp.
"""


def test_relayed_flower_output_keeps_tba_feds_lines_and_flowers_warnings_in_one_format():
    out = list(without_noise(io.StringIO(RELAYED)))
    kept = [re.sub(STAMP, "T", line.rstrip("\n")) for line in out]
    assert kept == ["T INFO tba_fed.deploy.simulate: simulating 3 sites",
                    "T INFO flwr: Successfully started run 13383625095188243520",
                    "T INFO tba_fed.federation.server: federation: 3 sites connected",
                    "(ClientAppActor pid=4242) T WARNING flwr: Secure aggregation is slow",
                    "T WARNING ray: file_system_monitor.cc:116: /tmp/ray is over 95% full",
                    "T ERROR flwr: Exit Code: 201",
                    "An unhandled exception occurred in the ServerApp."], kept
    assert list(relayed(io.StringIO(RELAYED), True)) == io.StringIO(RELAYED).readlines()  # --verbose: as it is


def test_progress_line():
    assert progress_line("statistics", 2, 3, ["hospital-c"], 40.4) == \
        "statistics: 2/3 sites replied, waiting for hospital-c, 40 s left"
    assert progress_line("probe", 1, 3, ["b", "c"], -2) == "probe: 1/3 sites replied, waiting for b, c, 0 s left"
    assert progress_line("probe", 3, 3, [], 12) == "probe: 3/3 sites replied"


@pytest.mark.usefixtures("server_identity")
def test_a_round_says_who_replied_and_whom_it_waits_for(caplog, monkeypatch):
    from test_delivery import LateSite, _messages

    monkeypatch.setattr(delivery, "POLL_SECONDS", 0.05)
    caplog.set_level(logging.INFO, "tba_fed.federation.delivery")
    names = {11: "hospital-a"}
    progress = RoundProgress("statistics", [11, 12], names, every=0.2)
    start = time.monotonic()
    got = [node for node, _ in replies_as_they_arrive(LateSite(delay=0.7), _messages([11, 12]), timeout=30,
                                                      progress=progress)]
    assert got == [11, 12] and time.monotonic() - start < 5
    records = [r for r in caplog.records if r.getMessage().startswith("statistics:")]
    lines = [re.sub(r"\d+ s left", "N s left", r.getMessage()) for r in records]
    # a line per reply, and while node 12 is awaited (0.7 s, polled every 0.05 s) one every 0.2 s, no more
    assert lines[0] == "statistics: 1/2 sites replied, waiting for node-12, N s left"
    assert lines[-1] == "statistics: 2/2 sites replied"
    assert lines[1:-1] == ["statistics: 1/2 sites replied, waiting for node-12, N s left"] * (len(lines) - 2)
    assert 2 <= len(lines) - 2 <= 4, lines
    assert all(b.created - a.created >= 0.19 for a, b in zip(records[:-2], records[1:-1]))
    assert re.search(r", (29|30) s left$", caplog.records[0].getMessage())


def test_the_server_says_how_many_sites_connected_while_it_waits(caplog, monkeypatch):
    caplog.set_level(logging.INFO, "tba_fed.federation.rounds")
    monkeypatch.setattr(rounds, "PROGRESS_SECONDS", 0.0)
    calls = iter([[], [5], [5], [5, 6, 7]])

    class Grid:
        def get_node_ids(self):
            return next(calls)

    monkeypatch.setattr(rounds.time, "sleep", lambda seconds: None)
    assert rounds.wait_for_nodes(Grid(), 3, 2, 900) == [5, 6, 7]
    lines = [re.sub(r"\d+ s left", "N s left", r.getMessage()) for r in caplog.records]
    assert lines == ["waiting for sites: 0/3 sites connected, N s left (min_sites 2)",
                     "waiting for sites: 1/3 sites connected, N s left (min_sites 2)",
                     "waiting for sites: 1/3 sites connected, N s left (min_sites 2)"], lines
    assert "900 s left" in caplog.records[0].getMessage() or "899 s left" in caplog.records[0].getMessage()


def test_a_clientapp_handler_configures_logging_in_the_process_that_runs_it(monkeypatch):
    """A simulation's Ray actors get the ClientApp pickled and never import clients/client_app.py: its `logged`
    mod configures their logging before the first handler runs there."""
    import tba_fed.federation as federation

    logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers if h not in _printing()]
    monkeypatch.setattr(federation, "_configured", None)  # a process that has not configured its logging
    assert federation.logged("msg", "context", lambda msg, context: (msg, context)) == ("msg", "context")
    assert len(_printing()) == 1 and logging.getLogger().level == logging.INFO


def test_a_long_pass_logs_its_progress_without_a_terminal(caplog, monkeypatch):
    caplog.set_level(logging.INFO, "tba_fed.experiment")
    logger = logging.getLogger("tba_fed.experiment")
    clock = iter(range(0, 1000, 5))  # each look at the clock 5 s later
    monkeypatch.setattr(time, "monotonic", lambda: float(next(clock)))
    items = list(range(12))
    assert list(tba_fed.logs.logged_progress(items, "fmnist seed 0: probe fit", logger, every=15, terminal=False)) \
        == items
    assert [r.getMessage() for r in caplog.records] == [
        "fmnist seed 0: probe fit: 3/12 batches, 15 s", "fmnist seed 0: probe fit: 6/12 batches, 30 s",
        "fmnist seed 0: probe fit: 9/12 batches, 45 s", "fmnist seed 0: probe fit: 12/12 batches, 60 s"]
    caplog.clear()
    assert list(tba_fed.logs.logged_progress(items, "x", logger, terminal=True)) == items and not caplog.records
