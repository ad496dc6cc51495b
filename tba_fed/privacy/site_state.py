"""A deployed site's state directory: the secret behind its per-image decisions, and its ledger's anchor.

Written once, by ``tba-fed site init DIR`` (`initialise`, in the site kit), and checked before every release
(`open_state`):

- ``split.key``: 32 random bytes that key the hash deciding which images are used and which are held
  out (`selection`). It never leaves the site, so the server can neither predict nor steer those
  decisions.
- ``site.json``: the marker that this site has been initialised, naming its ledger. A ledger that is
  later missing, moved or re-pointed would silently reset the privacy budget to zero; with the marker
  in place the site refuses every release instead, until the ledger is restored.

Deleting the whole state directory together with the ledger is indistinguishable from a new site:
back both up, and keep the audit log (which the server's log anchors).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import load_json
from ..fileio import atomic_write
from ..errors import TBAInputError
from ..selection import KEY_BYTES, check_key
from .ledger import PrivacyLedger, now

_logger = logging.getLogger(__name__)

FORMAT = "tba-fed site state 1"
MARKER = "site.json"
KEY_FILE = "split.key"
INIT = "run `tba-fed site init DIR` once on this machine (docs/deployment.md §3)"


@dataclass(frozen=True)
class SiteState:
    """What a release needs from the state directory: the split key and the ledger it was initialised with."""

    folder: Path
    site: str
    split_key: bytes
    ledger: Path


def initialise(folder: Path, site: str, ledger: Path) -> SiteState:
    """Create the state directory: a fresh split key, the ledger (empty unless one exists) and the marker.

    Refuses a directory that already holds a state: a new key would change which images every later
    release uses, and re-initialising must never be a way to forget a ledger.
    """
    folder, ledger = Path(folder).absolute(), Path(ledger).absolute()
    if (folder / MARKER).exists() or (folder / KEY_FILE).exists():
        raise TBAInputError("state", f"{folder} already holds this site's state",
                            "nothing to do; to start over as a new site, choose a new, empty state directory and "
                            "ledger (the old ledger's budget is then no longer counted: a governance decision)")
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = os.urandom(KEY_BYTES).hex().encode() + b"\n"
        atomic_write(folder / KEY_FILE, lambda tmp: tmp.write_bytes(key), mode=0o600, durable=True)
        adopted = PrivacyLedger(ledger).initialise()
        marker = {"format": FORMAT, "site": site, "ledger": str(ledger), "created": now()}
        atomic_write(folder / MARKER, lambda tmp: tmp.write_text(json.dumps(marker, indent=2) + "\n"), mode=0o644,
                     durable=True)
    except OSError as err:
        raise TBAInputError("state", f"{folder} cannot be written ({err.strerror or err})",
                            "set state to a directory this site's user can create and write") from None
    _logger.info("site %s: state initialised in %s (%s ledger %s)", site, folder,
                 "existing" if adopted else "new", ledger)
    return open_state(folder, site, ledger)


def open_state(folder: Path, site: str, ledger: Path) -> SiteState:
    """The site's state, once the marker, the key and the ledger it names are all in place; refuses otherwise."""
    folder, ledger = Path(folder).absolute(), Path(ledger).absolute()
    try:
        marker = load_json((folder / MARKER).read_text())
        if marker.get("format") != FORMAT:
            raise ValueError(f"unknown format {marker.get('format')!r}")
    except FileNotFoundError:
        raise TBAInputError("state", f"{folder} holds no initialised site state: this site makes no release", INIT) from None
    except (OSError, ValueError, AttributeError, RecursionError) as err:
        raise TBAInputError("state", f"{folder / MARKER} is unreadable ({err}): this site makes no release",
                          "restore the state directory from backup") from None
    recorded = Path(str(marker.get("ledger", "")))
    if recorded != ledger:
        raise TBAInputError("privacy.ledger", f"this site was initialised with the ledger {recorded}, and its YAML now "
                                            f"names {ledger}: a re-pointed ledger would reset the privacy budget",
                          f"point privacy.ledger back at {recorded}")
    if not ledger.is_file():
        raise TBAInputError("privacy.ledger", f"{ledger} is missing; this site was initialised with it on "
                                            f"{marker.get('created')}: refusing every release (a missing ledger "
                                            "would reset the privacy budget)", "restore the ledger from backup")
    try:
        key = bytes.fromhex((folder / KEY_FILE).read_text().strip())
        check_key(key)
    except (OSError, ValueError, TBAInputError):
        raise TBAInputError("state", f"{folder / KEY_FILE} is missing or unreadable: this site makes no release (a new "
                                   "key would change which images every release uses)",
                          "restore the state directory from backup") from None
    return SiteState(folder, site, key, ledger)
