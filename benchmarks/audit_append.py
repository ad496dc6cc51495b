"""Audit log: time per append, the old full-verify path vs the incremental one, side by side in one run.

    python benchmarks/audit_append.py                          # 1,000, 10,000 and 100,000 entries
    python benchmarks/audit_append.py --sizes 1000 10000 --dir /srv/tba-fed

For each size, two copies of one log of site statistics entries (~1.2 KB each, like a real site's)
take appends in turn, interleaved per repeat:

- old: what ``AuditLog.append`` did before: under the lock, ``check_chain`` over the whole log (parse and
  re-hash every entry), then write and fsync the entry;
- first use: ``AuditLog.append`` on a fresh object (a fresh process: in a deployment every ClientApp
  message is one), which checks the whole log once;
- new: the same object's next appends (a long-lived process: the server during a run): re-hash the
  verified bytes, check the entries added since, write and fsync.

The medians and the ratios old/new and old/first use are printed. Write the logs on the disk the logs
live on (`--dir`): fsync is part of every append.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tba_fed.audit import GENESIS, AuditLog, chained, check_chain, locked

SENT = {f"statistics:{split}/1-2/{name}": shape for split in ("calibration", "heldout")
        for name, shape in (("gram_triu", [1176]), ("cross", [2304]), ("sum_x", [48]), ("sum_y", [48]),
                            ("count", []), ("tokens", []), ("images", []))}
EVENT = {"role": "site", "site": "hospital-a", "run_id": "4711", "round": "statistics", "release": "statistics",
         "message_type": "query.statistics", "spec_sha256": "5" * 64, "request_sha256": "a" * 64, "received": {},
         "status": "ok", "sent_sha256": "b" * 64, "sent": SENT, "grant": {"mechanism": "exact"}}


def write_log(path: Path, entries: int) -> None:
    """A valid chain of `entries` statistics entries, written at once."""
    head, lines = GENESIS, []
    for seq in range(entries):
        head, line = chained(seq, head, {**EVENT, "run_id": str(seq)})
        lines.append(line)
    path.write_bytes(b"".join(lines))


def old_append(path: Path) -> None:
    """The append as it was: the whole chain checked under the lock, then the entry written and fsynced."""
    with locked(path):
        check = check_chain(path)
        if check.problems:
            raise RuntimeError(str(check.problems[0]))
        _, line = chained(len(check.entries), check.head, EVENT)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def timed(append: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    append(*args)
    return time.perf_counter() - start


def measure(folder: Path, entries: int, repeats: int, steady: int) -> dict[str, float]:
    """Per repeat: one old append to one copy; to the other, a fresh AuditLog's first append, then `steady` more."""
    old, new = folder / f"old-{entries}.jsonl", folder / f"new-{entries}.jsonl"
    write_log(old, entries)
    new.write_bytes(old.read_bytes())
    times: dict[str, list[float]] = {"old": [], "first": [], "new": []}
    for _ in range(repeats):
        times["old"].append(timed(old_append, old))
        log = AuditLog(new)  # a fresh process's object: its first append checks the whole log, the last repeat's too
        times["first"].append(timed(log.append, EVENT))
        times["new"] += [timed(log.append, EVENT) for _ in range(steady)]
    result = {side: statistics.median(values) for side, values in times.items()}
    result["megabytes"] = old.stat().st_size / 1e6
    old.unlink()
    new.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000], help="log lengths (entries)")
    parser.add_argument("--repeats", type=int, default=3, help="old appends and fresh objects per size (median)")
    parser.add_argument("--steady", type=int, default=10, help="appends of each fresh object after its first")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the logs (default: a temporary directory)")
    args = parser.parse_args()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    print("| entries | log (MB) | old append (s) | new append (s) | first use (s) | old / new | old / first use |")
    print("|---|---|---|---|---|---|---|", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="audit-append-") as folder:
        for entries in args.sizes:
            row = measure(Path(folder), entries, args.repeats, args.steady)
            rows.append((entries, row))
            print(f"| {entries:,} | {row['megabytes']:.1f} | {row['old']:.4f} | {row['new']:.4f} | {row['first']:.4f} | "
                  f"{row['old'] / row['new']:.1f} | {row['old'] / row['first']:.2f} |", flush=True)
    (small, first), (large, last) = rows[0], rows[-1]
    print(f"{large:,} vs {small:,} entries: old append {last['old'] / first['old']:.1f}x, "
          f"new append {last['new'] / first['new']:.1f}x")


if __name__ == "__main__":
    main()
