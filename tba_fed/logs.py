"""How every tba-fed process logs: one handler, one line format, Flower's and Ray's chatter left out unless verbose.

The CLI and Flower's app processes (ServerApp, ClientApp, which Flower starts) call `configure`, so a line reads
the same whichever process wrote it. Each record is written once: the one handler sits on the root logger, and
the loggers that had their own (tba_fed's, Flower's console handler) hand their records to it instead, so nothing
is printed twice in two formats. Flower's processes learn the CLI's verbosity from `VERBOSE_ENV`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
VERBOSE_ENV = "TBA_FED_VERBOSE"  # "1" in the environment of the Flower processes a verbose tba-fed starts
# below these levels a library's records are its own business, shown only with --verbose
QUIET = {"flwr": logging.WARNING, "ray": logging.WARNING, "httpx": logging.WARNING}
# Flower's warnings on a normal run: each simulated site's actor "terminated" at every shutdown, and the
# simulation's default size, which tba-fed always sets
NOISE = ("Manually terminating", "Since flwr 1.32, default simulated SuperNodes changed")
PROGRESS_SECONDS = 15.0  # longest silence of a long wait or pass when no progress bar shows it


class Quiet(logging.Filter):
    """Drops the records of `QUIET` libraries below their level, and Flower's `NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        library = record.name.split(".", 1)[0]
        if record.levelno < QUIET.get(library, logging.NOTSET):
            return False
        return not (library == "flwr" and str(record.msg).startswith(NOISE))


def formatter() -> logging.Formatter:
    return logging.Formatter(FORMAT)


def configure(verbose: bool, stream: TextIO | None = None) -> logging.Handler:
    """Log INFO and above (DEBUG and every library's records if `verbose`) through one handler on `stream`
    (stderr); replaces the root's printing handlers (opacus calls basicConfig when imported; an earlier
    `configure`) and detaches those of tba_fed and Flower (its ConsoleHandler); log files and captures stay.
    Python's warnings become log records; Ray's FutureWarnings are dropped unless `verbose`."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if _console(h)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter())
    if not verbose:
        handler.addFilter(Quiet())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in ("tba_fed", "flwr"):  # Flower's console handler: its records go through ours, in our format
        logger = logging.getLogger(name)
        for own in [h for h in logger.handlers if _console(h)]:
            logger.removeHandler(own)
        logger.propagate = True
    logging.captureWarnings(True)
    if not verbose:  # "in future versions of Ray ...": about Ray's defaults, nothing a tba-fed user can act on
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\.|$)")
    return handler


def _console(handler: logging.Handler) -> bool:
    """A handler that prints (to a terminal stream or one given to `configure`), as opposed to a log file or a
    test's capture: replaced by `configure`'s, which would print its records a second time."""
    return type(handler) is logging.StreamHandler or (isinstance(handler, logging.StreamHandler)
                                                      and type(handler).__name__ == "ConsoleHandler")


def verbose_from_env() -> bool:
    """Whether the tba-fed that started this Flower process was verbose."""
    return os.environ.get(VERBOSE_ENV, "") == "1"


def verbose_env() -> dict[str, str]:
    """`VERBOSE_ENV` for the Flower processes this one starts: set if this process logs DEBUG."""
    return {VERBOSE_ENV: "1"} if logging.getLogger("tba_fed").isEnabledFor(logging.DEBUG) else {}


def logged_progress(items: Iterable[T], desc: str, logger: logging.Logger, *, unit: str = "batches",
                    every: float = PROGRESS_SECONDS, terminal: bool | None = None) -> Iterator[T]:
    """`items`, with a line at most every `every` seconds ("desc: 40/120 batches, 31 s") where stderr is not a
    terminal (`terminal`: None asks stderr), so a long pass says how far it is in a log file too; on a terminal
    tqdm's bars, which are off elsewhere, show it."""
    if terminal if terminal is not None else sys.stderr.isatty():
        yield from items
        return
    total = f"/{len(items)}" if hasattr(items, "__len__") else ""
    start = last = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every:
            last = now
            logger.info("%s: %d%s %s, %.0f s", desc, done, total, unit, now - start)
