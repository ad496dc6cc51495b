"""CLI start-up: `tba-fed --help` and `tba-fed compress --help` wall time, side by side with baselines in one run.

    python benchmarks/cli_startup.py                 # 7 interleaved repeats
    python benchmarks/cli_startup.py --repeats 15

Each command is a fresh interpreter (what a user waits for), timed from spawn to exit, interleaved per repeat
so that the load of a shared machine falls on all of them alike:

- `tba-fed --help`, `tba-fed compress --help`: the console script as installed;
- eager: the same parser after importing what `tba_fed/__init__.py` and `cli.py` imported before the lazy
  imports (ee76959: the engine, the pipeline and `federation.simulate`, hence torch, timm, Flower and Opacus);
- `python -c "import torch"` and `python -c pass`: the floor of anything that loads torch, and of the interpreter.

Prints the medians, the ratio eager / lazy, and whether `tba-fed --help` is within the 1 s target.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

EAGER = ("import tba_fed.adapter, tba_fed.checkpoint, tba_fed.compressed, tba_fed.config, tba_fed.errors, "
         "tba_fed.deploy.simulate, tba_fed.models, tba_fed.pipeline, tba_fed.plan, tba_fed.solver, tba_fed.stats, "
         "tba_fed.data, tba_fed.fileio, tba_fed.report, tba_fed.selection\n"
         "from tba_fed.cli import main\n"
         "raise SystemExit(main({argv!r}))")
TARGET_SECONDS = 1.0


def commands() -> dict[str, list[str]]:
    script = shutil.which("tba-fed", path=str(Path(sys.executable).parent)) or shutil.which("tba-fed")
    if script is None:
        raise SystemExit("tba-fed is not installed in this environment (run scripts/setup.sh)")
    python = sys.executable
    return {
        "tba-fed --help": [script, "--help"],
        "tba-fed compress --help": [script, "compress", "--help"],
        "eager: tba-fed --help": [python, "-c", EAGER.format(argv=["--help"])],
        "eager: tba-fed compress --help": [python, "-c", EAGER.format(argv=["compress", "--help"])],
        'python -c "import torch"': [python, "-c", "import torch"],
        "python -c pass": [python, "-c", "pass"],
    }


def wall_time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    runs = commands()
    for argv in runs.values():  # warm the file cache once; not timed
        wall_time(argv)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, argv in runs.items():
            times[name].append(wall_time(argv))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{platform.machine()}, {platform.python_version()}, median of {args.repeats} interleaved repeats\n")
    print("| command | median (s) | min (s) | max (s) |\n|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {median[name]:.2f} | {min(values):.2f} | {max(values):.2f} |")
    print()
    for command in ("tba-fed --help", "tba-fed compress --help"):
        print(f"{command}: eager / lazy = {median['eager: ' + command] / median[command]:.1f}x; "
              f"{'within' if median[command] <= TARGET_SECONDS else 'over'} the {TARGET_SECONDS:.0f} s target")


if __name__ == "__main__":
    main()
