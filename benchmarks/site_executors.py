"""Sites take turns to compute: at most `slots` SuperExecs run at once, each serving one task.

Twenty sites on one 2-core, 24 GiB machine cannot all compute at once: every ClientApp imports torch
(~0.5 GB private memory before any work) and holds its reply (~1.4 GB RSS at the peak with 113 MB replies).
Lowering their priority instead does not work with Flower 1.41: a launched ClientApp must claim its task
within 30 s (HEARTBEAT_DEFAULT_INTERVAL) or the SuperExec launches another one, every 30 s, while the
starved ones keep importing.

So the SuperNodes run with ``--isolation process`` (Flower's mode where the operator runs the SuperExec,
the component that launches ClientApps) and this class starts each site's ``flower-superexec`` in turn,
round robin: a site keeps its slot until the ClientApp it launched has exited, or gives it up after
`idle` seconds without a task; a site's message waits at its SuperNode meanwhile. Every SuperNode stays
connected (TLS, authenticated, heartbeating) and every reply crosses the wire as in any deployment.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tba_fed.deploy.processes import stop_process

from process_memory import ProcessMonitor, proc_table  # benchmarks/, next to this script

BIN = Path(sys.executable).parent


@dataclass
class Turn:
    process: subprocess.Popen
    address: str
    log: IO[str]
    started: float
    launched: bool = False  # a ClientApp of this SuperExec has been seen running


class SiteExecutors(threading.Thread):
    """Round-robin SuperExecs for SuperNodes started with ``--isolation process``; `served` counts the turns
    that ended with a ClientApp having run."""

    def __init__(self, slots: int, monitor: ProcessMonitor, env: dict[str, str], logs: Path, *, idle: float = 60.0,
                 interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.slots, self.monitor, self.env, self.logs, self.idle, self.interval = slots, monitor, env, logs, idle, interval
        self.queue: deque[tuple[str, str]] = deque()  # (site, its SuperNode's runtime API address), in turn order
        self.turns: dict[str, Turn] = {}
        self.served = 0
        self._lock, self._halt = threading.Lock(), threading.Event()

    def add(self, site: str, address: str) -> None:
        with self._lock:
            self.queue.append((site, address))

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            with self._lock:
                self._step()

    def close(self) -> None:
        """Stop the thread and every SuperExec it started (by pid)."""
        self._halt.set()
        if self.is_alive():
            self.join()
        for site in list(self.turns):
            self._end(site)

    def _end(self, site: str) -> None:
        turn = self.turns.pop(site)
        stop_process(turn.process)
        turn.log.close()
        self.served += turn.launched

    def _step(self) -> None:
        table = proc_table()
        for site, turn in list(self.turns.items()):
            running = any(p.parent == turn.process.pid and p.state != "Z" and "flwr-clientapp" in p.cmdline
                          for p in table.values())
            turn.launched |= running
            if not running and (turn.launched or time.monotonic() - turn.started > self.idle):
                self._end(site)
                self.queue.append((site, turn.address))
        while len(self.turns) < self.slots and self.queue:
            site, address = self.queue.popleft()
            log = open(self.logs / f"{site}-superexec.log", "a")  # noqa: SIM115 - closed when the turn ends
            process = subprocess.Popen([str(BIN / "flower-superexec"), "--insecure", "--runtime-api-address", address],
                                       env=self.env, stdout=log, stderr=subprocess.STDOUT)
            self.monitor.watch(process.pid, "superexec", site)
            self.turns[site] = Turn(process, address, log, time.monotonic())
