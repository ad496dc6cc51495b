"""``tba-fed site init DIR``: a hospital's site kit, made at the hospital.

Everything secret is made here and stays here: the SuperNode's authentication key pair (EC P-384 in OpenSSH
format, what ``flower-supernode --auth-supernode-private-key`` reads and what the SuperLink registers; the
coordinator used to generate every site's private key and mail it out) and the state directory (the split key,
the ledger and its marker: `privacy.site_state`). The kit's ``site.yaml`` is filled from the flags. The one file
that leaves the site is the public key, which the coordinator lists under the run YAML's ``superlink.sites``.

Nothing existing is replaced: every file the kit would write is checked first, and each is then written
atomically without ever replacing a name that appeared meanwhile (``atomic_write(exclusive=True)``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..config import validate
from ..errors import TBAInputError
from ..fileio import atomic_write
from ..federation.config import SiteConfig
from ..privacy.site_state import KEY_FILE, MARKER, initialise
from .certificates import is_ca, load_certificate

_logger = logging.getLogger(__name__)

SITE_YAML = "site.yaml"
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
CURVE = ec.SECP384R1  # what scripts/make-certificates.sh makes (ssh-keygen -t ecdsa -b 384); Flower takes any NIST curve


@dataclass(frozen=True)
class SiteKit:
    """Where a kit's files are: `public_key` is the one to send, `site_yaml` the one every command reads."""

    folder: Path
    site_yaml: Path
    private_key: Path
    public_key: Path
    state: Path
    ledger: Path
    output: Path


def kit_layout(folder: Path, name: str) -> SiteKit:
    if not NAME.fullmatch(name):
        raise TBAInputError("--name", f"{name!r} cannot name a site's files",
                            "use letters, digits, '.', '-' and '_', e.g. --name hospital-a")
    folder = Path(folder).absolute()
    key = folder / "keys" / f"{name}.key"
    return SiteKit(folder, folder / SITE_YAML, key, key.with_name(f"{name}.key.pub"), folder / "state",
                   folder / "privacy-ledger.json", folder / "out")


def kit_yaml(kit: SiteKit, name: str, *, superlink: str, ca_certfile: Path, data: dict[str, Any],
             model: dict[str, Any], privacy: dict[str, Any], port: int | None = None) -> dict[str, Any]:
    """The site YAML of a kit: its connection points at the kit's own key, its state and ledger in the kit."""
    connection = {"superlink": superlink, "root_certificates": str(Path(ca_certfile).absolute()),
                  "auth_key": str(kit.private_key), **({"port": port} if port is not None else {})}
    return {"name": name, "profile": "production", "connection": connection, "model": model, "data": data,
            "output": str(kit.output), "device": "cpu", "privacy": {**privacy, "ledger": str(kit.ledger)},
            "state": str(kit.state)}


def _refuse_existing(kit: SiteKit) -> None:
    """One line naming the first file of the kit that already exists: init never replaces anything."""
    for path, what in ((kit.site_yaml, "a site YAML"), (kit.private_key, "a private key"),
                       (kit.public_key, "a public key"), (kit.state / MARKER, "a site state"),
                       (kit.state / KEY_FILE, "a split key")):
        if path.exists() or path.is_symlink():
            raise TBAInputError("DIR", f"{path} already exists ({what}): site init never replaces a file",
                                "keep that kit (tba-fed preflight its site.yaml), or give a new, empty directory")


def _check_ca(path: Path) -> None:
    if not is_ca(load_certificate(path, "--ca")):
        raise TBAInputError("--ca", f"{path} is not a CA certificate (no CA:TRUE basic constraint)",
                            "give the coordinator's ca.crt, the certificate that signed the SuperLink's")


def write_key_pair(private: Path, public: Path, comment: str) -> ec.EllipticCurvePublicKey:
    """A fresh SuperNode key pair: the private key 0600 in a 0700 folder, the public key readable, each new."""
    key = ec.generate_private_key(CURVE())
    private_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption())
    public_bytes = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(private, lambda tmp: tmp.write_bytes(private_bytes), mode=0o600, durable=True, exclusive=True)
    atomic_write(public, lambda tmp: tmp.write_bytes(public_bytes + f" {comment}\n".encode()), mode=0o644,
                 durable=True, exclusive=True)
    return key.public_key()


def init_site(folder: Path, raw: dict[str, Any]) -> SiteKit:
    """Write the kit `raw` (from `kit_yaml`) describes in `folder`: check the YAML and the CA, refuse any file
    already there, then the key pair, the state (ledger included) and last the site YAML."""
    site = validate(SiteConfig, raw)  # every field named before anything is written
    kit = kit_layout(folder, site.name)
    if kit.folder.exists() and not kit.folder.is_dir():
        raise TBAInputError("DIR", f"{kit.folder} is not a directory", "give a new or an empty directory for the kit")
    assert site.connection is not None and site.connection.root_certificates is not None
    _check_ca(site.connection.root_certificates)
    _refuse_existing(kit)
    try:
        kit.folder.mkdir(parents=True, exist_ok=True)
        write_key_pair(kit.private_key, kit.public_key, site.name)
        initialise(kit.state, site.name, kit.ledger)
        text = (f"# {site.name}'s own settings, written by tba-fed site init (nothing here is sent anywhere);\n"
                "# edit freely: tba-fed preflight checks it. docs/deployment.md explains every field.\n"
                + yaml.safe_dump(raw, sort_keys=False))
        atomic_write(kit.site_yaml, lambda tmp: tmp.write_text(text), mode=0o644, exclusive=True)
    except FileExistsError as err:
        raise TBAInputError("DIR", f"{err.filename2 or err.filename} appeared while site init wrote the kit: it was not replaced",
                            "give a new, empty directory") from None
    _logger.info("site %s: kit written in %s", site.name, kit.folder)
    return kit
