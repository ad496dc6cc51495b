"""A site's persistent privacy ledger: every release, its mechanism, and the budget left.

The ledger is one JSON document replaced atomically (temporary file, fsync, rename, fsync of the
directory), under an exclusive lock, so a crash mid-write leaves the previous complete ledger.
A release is recorded before its payload leaves the site (write-ahead): a crash after recording
can only over-count the budget, never under-count it. Entries are idempotent per run and release:
asking again for a recorded release spends nothing more (the site re-sends the stored payload,
see `release_store`). A run's privacy terms (ε, δ, accountant, declared releases) are fixed by its
first recorded request: a later request of the run that declares others is refused, so a server
cannot spend more than one run's ε by declaring each release on its own. A ledger that cannot be
read is an error, never an empty ledger; a deployed site's state directory also refuses a missing
one (`site_state`). Reading validates every entry (types, finite numbers, a σ the accountants can
compose), so a damaged or forged ledger is refused with the entry and field named, never half-believed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, ClassVar, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import load_json
from ..fileio import atomic_write, file_lock
from ..errors import SiteRefusal, TBAInputError
from .accounting import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER, epsilon_spent, replace_one_epsilon

_logger = logging.getLogger(__name__)
FORMAT: Final = "tba-fed privacy ledger 1"


_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
Positive = Annotated[float, Field(gt=0)]


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded release; the annotations are also the schema a ledger read from disk must meet."""

    __pydantic_config__: ClassVar[ConfigDict] = _STRICT

    run_id: str
    release: str
    spec_sha256: str
    mechanism: str
    noise_multiplier: Annotated[float, Field(ge=MIN_NOISE_MULTIPLIER, le=MAX_NOISE_MULTIPLIER)]
    noise_std: dict[str, Annotated[float, Field(ge=0)]]
    noise: str
    aggregation: str
    images: Annotated[int, Field(ge=0)]
    epsilon_run: Positive
    delta: Annotated[float, Field(gt=0, lt=1)]
    time: str
    payload_sha256: str | None = None  # set once the noisy payload is stored; None: granted, never produced
    site_noise_multiplier: Positive | None = None  # the σ this site applied (σ/√m when m sites split the noise)
    accountant: Literal["rdp", "prv"] | None = None  # the run's accountant, which calibrated σ (older entries: None)
    releases: tuple[str, ...] | None = None  # every release the run declared at this request

    def __post_init__(self) -> None:
        if isinstance(self.releases, list):  # read back from JSON
            object.__setattr__(self, "releases", tuple(self.releases))

    def run_terms(self) -> dict[str, object]:
        """What a run fixes at its first request; None where an entry predates the field."""
        return {"epsilon": self.epsilon_run, "delta": self.delta, "accountant": self.accountant,
                "releases": self.releases}


class _LedgerFile(BaseModel):
    """The ledger document as written by `PrivacyLedger._write`."""

    model_config = _STRICT

    format: Literal[FORMAT]
    entries: list[LedgerEntry]


class BudgetExceeded(SiteRefusal):
    """The release would take the site past its privacy budget, or spend it twice: refused, nothing sent."""


class PrivacyLedger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.path.with_name(self.path.name + ".lock"), lambda err: unwritable(self.path, err))

    def entries(self) -> list[LedgerEntry]:
        """Every recorded release, each entry validated; an unreadable or invalid ledger is refused."""
        if not self.path.exists():
            return []
        try:
            raw = self.path.read_bytes()
            load_json(raw)  # refuses a key given twice, where pydantic's parser keeps the last one
            return _LedgerFile.model_validate_json(raw).entries
        except OSError as err:
            reason = err.strerror or str(err)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            reason = f"{where + ': ' if where else ''}{first['msg']}"
        except (ValueError, RecursionError) as err:  # not JSON, a key given twice, nested past the parser
            reason = f"{type(err).__name__}: {err}"[:200]
        raise TBAInputError("privacy.ledger", f"{self.path} is unreadable ({reason}); refusing to release anything",
                            "restore the ledger from backup; never delete it to reset a budget")

    def spent(self, delta: float, accountant: str = "rdp") -> float:
        """ε spent so far at `delta`, composing every recorded release."""
        return _composed([e.noise_multiplier for e in self.entries()], delta, accountant)

    def initialise(self) -> bool:
        """Create an empty ledger unless one exists (`site_state.initialise`); True if one existed."""
        with self._locked():
            if self.path.exists():
                self.entries()  # an unreadable ledger is refused, never adopted
                return True
            self._write([])
            return False

    def record(self, entry: LedgerEntry, *, budget: float, delta: float, accountant: str = "rdp") -> LedgerEntry:
        """Append `entry` if the budget allows its whole run: this release plus the run's other declared
        releases (`entry.releases`) it has not recorded yet, all at the entry's σ. Decided under the lock.

        Budgets are accounted at the site's `delta` with the site's `accountant`, whatever accountant
        calibrated the run's σ. Idempotent per (run id, release): the same release asked again with the
        same specification returns the recorded entry and spends nothing; with another specification it
        is refused (a fresh noisy copy would spend budget again). A run's terms are those of its first
        recorded request (`LedgerEntry.run_terms`). Returns the entry as recorded.
        """
        with self._locked():
            entries = self.entries()
            first = next((e for e in entries if e.run_id == entry.run_id), None)
            if first is not None and (changed := _changed_terms(first, entry)):
                raise RunTermsChanged("privacy." + changed[0], f"run {entry.run_id} declared "
                                      f"{_terms_text(first)} at its first request, this request declares "
                                      f"{_terms_text(entry)}: a run's privacy terms are fixed by its first request",
                                      "start a new run to release under other terms")
            if (previous := _find(entries, entry.run_id, entry.release)) is not None:
                if previous.spec_sha256 != entry.spec_sha256:
                    raise BudgetExceeded("privacy.ledger", f"run {entry.run_id} already made its {entry.release!r} release "
                                                           "under another specification (a secure release: other "
                                                           "SecAgg+ participants); releasing again would spend budget "
                                                           "twice, or let the server subtract one sum from the other",
                                         "start a new run")
                _logger.info("ledger %s: %s of run %s already recorded; nothing more spent", self.path, entry.release,
                             entry.run_id)
                return previous
            recorded = {e.release for e in entries if e.run_id == entry.run_id}
            sigmas = [e.noise_multiplier for e in entries]
            planned = [entry.noise_multiplier for r in entry.releases or () if r != entry.release and r not in recorded]
            projected = _composed([*sigmas, entry.noise_multiplier, *planned], delta, accountant)
            if projected > budget * (1 + 1e-9):
                raise BudgetExceeded("privacy.epsilon", f"this run would bring the site to ε={projected:.3f} at "
                                                        f"δ={delta:g}; its budget is {budget:g} "
                                                        f"({_composed(sigmas, delta, accountant):.3f} spent)",
                                     "ask for a smaller ε")
            self._write([*entries, entry])
            after = _composed([*sigmas, entry.noise_multiplier], delta, accountant)
        _logger.info("ledger %s: recorded %s of run %s (σ=%.4g); ε spent %.4f of %g", self.path, entry.release,
                     entry.run_id, entry.noise_multiplier, after, budget)
        return entry

    def complete(self, run_id: str, release: str, payload_sha256: str) -> None:
        """Mark a recorded release as produced: its stored payload has this sha256."""
        with self._locked():
            entries = self.entries()
            if (previous := _find(entries, run_id, release)) is None:
                raise TBAInputError("privacy.ledger", f"run {run_id} has no recorded {release!r} release to complete")
            self._write([replace(e, payload_sha256=payload_sha256) if e is previous else e for e in entries])

    def _write(self, entries: list[LedgerEntry]) -> None:
        text = json.dumps({"format": FORMAT, "entries": [asdict(e) for e in entries]}, indent=2) + "\n"
        atomic_write(self.path, lambda tmp: tmp.write_text(text), durable=True,
                     unwritable=lambda err: unwritable(self.path, err))


def unwritable(path: Path, err: OSError) -> TBAInputError:
    """The error of a site that cannot keep its privacy records: it releases nothing."""
    return TBAInputError("privacy.ledger", f"{path} cannot be written ({err.strerror or err}); refusing to release "
                                           "anything", "set privacy.ledger to a path in a directory this site's user can write")


class RunTermsChanged(SiteRefusal):
    """A request of a run declares other privacy terms than the run's first request: refused, nothing sent."""


def _changed_terms(first: LedgerEntry, entry: LedgerEntry) -> list[str]:
    """The terms in which `entry` differs from its run's first entry (a term an old entry lacks is not compared)."""
    old, new = first.run_terms(), entry.run_terms()
    return [k for k in old if old[k] is not None and new[k] is not None and old[k] != new[k]]


def _terms_text(entry: LedgerEntry) -> str:
    return (f"(ε={entry.epsilon_run:g}, δ={entry.delta:g}, accountant {entry.accountant}, releases "
            f"{', '.join(entry.releases or ())})")


def _find(entries: Sequence[LedgerEntry], run_id: str, release: str) -> LedgerEntry | None:
    return next((e for e in entries if e.run_id == run_id and e.release == release), None)


def _composed(sigmas: Sequence[float], delta: float, accountant: str) -> float:
    """ε at `delta` of one Gaussian release per σ."""
    return epsilon_spent([(sigma, 1) for sigma in sigmas], delta, accountant)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def ledger_report(ledger: PrivacyLedger, budget: float, delta: float, accountant: str = "rdp") -> str:
    """Markdown: every release and the budget left (``tba-fed privacy report``)."""
    entries = ledger.entries()
    spent = ledger.spent(delta, accountant)
    replace_one = replace_one_epsilon([(e.noise_multiplier, 1) for e in entries], delta, accountant)
    lines = [f"# Privacy ledger {ledger.path}", "",
             f"- releases: {len(entries)}; ε spent {spent:.4f} of {budget:g} at δ={delta:g} ({accountant.upper()} "
             f"composition); remaining {max(budget - spent, 0.0):.4f}",
             "- the unit protected is one image, under add/remove-one-image adjacency; under replace-one adjacency "
             f"the same releases give ε ≤ {replace_one:.4f}", "",
             "| time | run | release | σ (accounted) | σ applied here | run ε | images | noise | aggregation | spec sha256 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        applied = "" if e.site_noise_multiplier is None else f"{e.site_noise_multiplier:.4g}"
        lines.append(f"| {e.time} | {e.run_id} | {e.release} | {e.noise_multiplier:.4g} | {applied} | {e.epsilon_run:g} "
                     f"| {e.images} | {e.noise} | {e.aggregation} | `{e.spec_sha256[:12]}` |")
    return "\n".join(lines) + "\n"
