"""Memory of a tree of processes, sampled from /proc: the processes a benchmark started and all their
descendants (Flower starts flower-superexec, flwr-serverapp and one flwr-clientapp per message by itself).

Linux only (psutil is not a dependency of tba-fed). RSS counts shared library pages in every process that
maps them, so summing RSS over processes overstates their joint use; the machine's memory in use
(MemTotal - MemAvailable) is sampled alongside, and includes everything else the machine runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time, command line) of every live process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = stat.rsplit(")", 1)[1].split()
            table[int(entry.name)] = (int(fields[1]), int(fields[19]), cmdline)
    return table


def _rss_kib(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # a SQLite journal may come and go between listing and stat
        return 0


def available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


def _role(cmdline: str) -> str:
    for marker, role in (("flwr-serverapp", "server app"), ("flwr-clientapp", "clientapp"),
                         ("flower-superexec", "superexec")):
        if marker in cmdline:
            return role
    return "other"


@dataclass(slots=True)
class Sample:
    time: float
    role: str
    site: str
    pid: int
    rss_kib: int


class ProcessMonitor(threading.Thread):
    """Samples RSS of the processes this benchmark started and of all their descendants, by role.

    Guard: if the machine's available memory falls below `floor_kib`, the descendants (ClientApps, server
    app) are killed by pid and `low_memory` says why, so a run too big for the machine fails alone.
    """

    def __init__(self, interval: float, floor_kib: int) -> None:
        super().__init__(daemon=True)
        self.interval, self.floor_kib = interval, floor_kib
        self.roots: dict[int, tuple[str, str]] = {}  # pid -> (role, site)
        self.samples: list[Sample] = []
        self.machine: list[tuple[float, int]] = []  # (time, KiB in use on the whole machine)
        self.low_memory: str | None = None
        self.seen: set[tuple[int, int]] = set()  # (pid, start time) of every process sampled
        self.database: Path | None = None  # the SuperLink's SQLite file: its size (with the WAL) is sampled too
        self.disk: list[tuple[float, int]] = []
        self._halt = threading.Event()
        self.total_kib = int(Path("/proc/meminfo").read_text().split()[1])

    def watch(self, pid: int, role: str, site: str = "") -> None:
        self.roots[pid] = (role, site)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def survivors(self, wait: float = 20.0) -> list[int]:
        """Processes sampled during the run that are still alive (children exit shortly after their parents)."""
        deadline = time.monotonic() + wait
        while True:
            table = _proc_table()
            alive = sorted(pid for pid, started in self.seen if pid in table and table[pid][1] == started)
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)

    def sample(self) -> None:
        now, table = time.monotonic(), _proc_table()
        available = available_kib()
        self.machine.append((now, self.total_kib - available))
        if self.database is not None:
            self.disk.append((now, sum(_size(p) for p in self.database.parent.glob(self.database.name + "*"))))
        descendants = []
        for pid, (_, started, cmdline) in table.items():
            node, hops = pid, 0
            while node in table and node not in self.roots and hops < 16:
                node, hops = table[node][0], hops + 1
            if node in self.roots and (rss := _rss_kib(pid)) is not None:
                role, site = self.roots[node]
                if pid != node:
                    role = _role(cmdline)
                    descendants.append(pid)
                self.samples.append(Sample(now, role, site, pid, rss))
                self.seen.add((pid, started))
        if available < self.floor_kib and self.low_memory is None:
            self.low_memory = (f"available memory fell to {available / MIB:.1f} GiB (floor {self.floor_kib / MIB:.1f} "
                               f"GiB): killed {len(descendants)} Flower app processes")
            for pid in descendants:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def peak(self, role: str, start: float, end: float) -> dict:
        """Largest RSS of any process of `role` sampled in [start, end] (MiB), with the site it belongs to."""
        inside = [s for s in self.samples if s.role == role and start <= s.time <= end]
        if not inside:
            return {"peak_rss_mib": None}
        top = max(inside, key=lambda s: s.rss_kib)
        return {"peak_rss_mib": round(top.rss_kib / 1024, 1), "site": top.site or None,
                "processes": len({s.pid for s in inside})}

    def sites_peak(self, start: float, end: float) -> float | None:
        """Largest sum of RSS over every site process (SuperNodes and their children) in one sweep (GiB)."""
        sweeps: dict[float, int] = {}
        for s in self.samples:
            if s.site and start <= s.time <= end:
                sweeps[s.time] = sweeps.get(s.time, 0) + s.rss_kib
        return round(max(sweeps.values()) / MIB, 2) if sweeps else None

    def machine_peak(self, start: float, end: float) -> float | None:
        inside = [kib for t, kib in self.machine if start <= t <= end]
        return round(max(inside) / MIB, 2) if inside else None

    def database_peak(self, start: float, end: float) -> float | None:
        inside = [size for t, size in self.disk if start <= t <= end]
        return round(max(inside) / MIB, 1) if inside else None

    def timeline(self, start: float, end: float, step: float = 5.0) -> list[dict]:
        """Every `step` seconds: the largest RSS per role and the machine's memory in use (MiB), for plots."""
        rows: dict[int, dict] = {}
        for s in self.samples:
            if start <= s.time <= end:
                row = rows.setdefault(int((s.time - start) // step), {})
                row[s.role] = max(row.get(s.role, 0), round(s.rss_kib / 1024))
        for t, kib in self.machine:
            if start <= t <= end:
                row = rows.setdefault(int((t - start) // step), {})
                row["machine"] = max(row.get("machine", 0), round(kib / 1024))
        return [{"t": k * step, **rows[k]} for k in sorted(rows)]
