"""The SuperLink as a named connection in Flower's own config file, derived from the run YAML
(``tba-fed connect RUN.yaml``; ``tba-fed submit`` adds it the same way before it runs ``flwr run``).

Flower (1.41, 1.42) gives ``flwr run`` no way to name a SuperLink on the command line or in the environment:
its second argument is a connection *name*, looked up only in ``$FLWR_HOME/config.toml`` (default
``~/.flwr/config.toml``) as ``[superlink.NAME]`` (``flwr/cli/flower_config.py``,
``read_superlink_connection``); ``--federation`` names an account's federation and
``--federation-config`` carries simulation options only. So the connection is written into that file,
where the operator's later ``flwr ls / log / stop NAME`` find it too (a private throwaway FLWR_HOME
would hide it from them, and from any login tokens kept there).

The file is rewritten atomically and only when the connection is missing; every other entry is kept
(comments are not: the file is re-serialised as plain TOML, as Flower's own writes do). A connection of
that name that points elsewhere is never replaced: the operator renames or fixes it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli
import tomli_w

from ..errors import TBAInputError
from ..fileio import atomic_write_text
from ..federation.config import FederatedRunConfig, SuperLinkConfig
from ..federation.flower_internals import default_flower_config, flower_config_path
from .certificates import load_certificate
from .profile import require_run

_logger = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # a bare TOML key, which `flwr` accepts as a connection name


def connection_entry(superlink: SuperLinkConfig) -> dict[str, Any]:
    """The ``[superlink.NAME]`` table for the run's SuperLink: the address sites dial, and the CA that signed
    its certificate (``insecure`` only where the profile allowed a SuperLink without TLS)."""
    entry: dict[str, Any] = {"address": superlink.fleet_address}
    if superlink.certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(superlink.certificates.ca_certfile.resolve())
    return entry


def check_name(name: str) -> str:
    if not NAME.match(name) or name == "default":
        raise TBAInputError("--connection", f"{name!r} cannot name a Flower connection",
                            "use letters, digits, '-' and '_' (not 'default'), e.g. --connection hospitals")
    return name


def _differences(existing: Any, entry: dict[str, Any]) -> list[str]:
    if not isinstance(existing, dict):
        return [f"it is a {type(existing).__name__}, not a table"]
    have = {k: v for k, v in existing.items() if not (k == "insecure" and v is False)}
    found = []
    for key in sorted(set(have) | set(entry)):
        there, here = have.get(key), entry.get(key)
        if key == "root-certificates" and there is not None and here is not None \
                and Path(there).expanduser().resolve() == Path(here):
            continue
        if there != here:
            found.append(f"{key} is {'absent' if there is None else repr(there)} there, "
                         f"{'absent' if here is None else repr(here)} for this run")
    return found


def _read(path: Path) -> dict[str, Any]:
    """The file's tables; Flower's default content if it does not exist yet (what `flwr` would create)."""
    try:
        return tomli.loads(path.read_text()) if path.exists() else tomli.loads(default_flower_config())
    except (OSError, UnicodeDecodeError) as err:
        raise TBAInputError("FLWR_HOME", f"cannot read {path} ({err})", "fix its permissions, or set FLWR_HOME to "
                                                                       "another directory") from None
    except tomli.TOMLDecodeError as err:
        raise TBAInputError("FLWR_HOME", f"{path} is not valid TOML ({err})",
                            "correct it (flwr reads the same file), or set FLWR_HOME to another directory") from None


def updated_config(path: Path, name: str, entry: dict[str, Any]) -> dict[str, Any] | None:
    """The file's content with ``[superlink.NAME] = entry`` added; None if it is there already.
    Raises if a connection of that name points elsewhere."""
    config = _read(path)
    superlink = config.setdefault("superlink", {})
    if not isinstance(superlink, dict):
        raise TBAInputError("FLWR_HOME", f"{path}: 'superlink' is not a table", "correct the file (flwr reads it too)")
    if name not in superlink:
        superlink[name] = entry
        return config
    if differences := _differences(superlink[name], entry):
        raise TBAInputError("--connection", f"the Flower connection [superlink.{name}] in {path} points elsewhere than "
                                            f"this run's superlink section: {'; '.join(differences)}",
                            f"pass --connection with a new name (tba-fed connect adds it), or correct or remove "
                            f"[superlink.{name}] in {path}")
    return None


def ensure_connection(path: Path, name: str, entry: dict[str, Any]) -> bool:
    config = updated_config(path, name, entry)
    if config is None:
        return False
    atomic_write_text(path, tomli_w.dumps(config))
    _logger.info("added the SuperLink connection [superlink.%s] (%s) to %s", name, entry["address"], path)
    return True


@dataclass(frozen=True)
class Connection:
    """The run's SuperLink as the connection ``[superlink.NAME]`` of Flower's config file."""

    name: str
    entry: dict[str, Any]       # the [superlink.NAME] table
    path: Path                  # $FLWR_HOME/config.toml
    adds: bool                  # whether the file lacks it (and will be rewritten)


def run_connection(config: FederatedRunConfig, name: str) -> Connection:
    """The connection a run YAML's superlink section describes, its profile's requirements and its CA checked;
    writes nothing. Raises TBAInputError, naming the field, for a bad YAML or a clashing connection."""
    superlink = require_run(config)
    if superlink.certificates is not None:
        load_certificate(superlink.certificates.ca_certfile, "superlink.certificates.ca_certfile")
    name = check_name(name)
    entry = connection_entry(superlink)
    path = flower_config_path()
    return Connection(name, entry, path, updated_config(path, name, entry) is not None)


def describe_connection(connection: Connection) -> str:
    """What `connect` would write (``--print``), as TOML."""
    table = tomli_w.dumps({"superlink": {connection.name: connection.entry}}).strip()
    return (f"# adds to {connection.path}:\n{table}" if connection.adds
            else f"# {connection.path} already has the connection:\n{table}")


def connect(connection: Connection) -> bool:
    """Add the connection to Flower's config file if it is missing; whether the file was rewritten."""
    return ensure_connection(connection.path, connection.name, connection.entry)
