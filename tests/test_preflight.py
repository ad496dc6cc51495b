"""``tba-fed preflight`` on real set-ups: certificates and keys from scripts/make-certificates.sh, a tiny
random ViT checkpoint pinned by its sha256, an image folder, and a real flower-superlink (TLS, SuperNode
authentication, database) started through ``tba-fed superlink``, which registers hospital-a's key only.
Each problem kind is provoked on a copy of the good set-up and its exact line asserted."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image
from safetensors.torch import save_file

from tba_fed import ModelConfig, TBAInputError, create_model
from tba_fed.cli import run_preflight
from tba_fed.fileio import file_sha256
from tba_fed.privacy.site_state import initialise
from tba_fed.deploy.certificates import load_auth_public_key
from tba_fed.federation.flower_internals import public_key_to_bytes
from tba_fed.federation.config import load_federated_config
from tba_fed.deploy.flower_control import registered_nodes
from tba_fed.deploy.preflight import preflight
from tba_fed.deploy.profile import verify_superlink
from tba_fed.deploy.processes import flower_env, free_port, stop_process

from conftest import TINY

pytestmark = pytest.mark.slow  # a real flower-superlink (module fixture)

REPO = Path(__file__).resolve().parents[1]
RENEW = "issue a new certificate (scripts/make-certificates.sh) and restart the SuperLink"
REACH = "check the SuperLink runs (tba-fed superlink RUN.yaml), the address, the firewall and the CA"
WRITABLE = "give a directory this user can create files in"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preflight")
    certs = tmp / "certs"
    subprocess.run(["bash", str(REPO / "scripts/make-certificates.sh"), str(certs), "127.0.0.1", "hospital-a",
                    "hospital-b"], check=True, capture_output=True)
    model = create_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY))
    checkpoint = tmp / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    model_config = {"name": "vit_tiny_patch16_224", "kwargs": TINY, "checkpoint": str(checkpoint),
                    "sha256": file_sha256(checkpoint)}
    images = tmp / "images"
    for k, label in enumerate(("a", "b")):
        (images / label).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(np.full((20, 20, 3), 6 * i + k, np.uint8)).save(images / label / f"{i}.png")
    port = free_port()
    server = {"model": model_config, "plan": "1->2", "output": str(tmp / "server-out"),
              "superlink": {"address": "127.0.0.1", "host": "127.0.0.1", "port": port,
                            "certificates": {"certfile": str(certs / "server.pem"), "keyfile": str(certs / "server.key"),
                                             "ca_certfile": str(certs / "ca.crt")},
                            "database": str(tmp / "state" / "superlink.db"),
                            "sites": {"hospital-a": str(certs / "hospital-a.key.pub")}}}
    site = {"name": "hospital-a", "model": model_config,
            # 40 distinct images, each held out with probability 0.5 by its hash under the site's secret key:
            # fewer than min_images = 2 in a part has probability 7e-11
            "data": {"source": "image_folder", "path": str(images), "holdout_fraction": 0.5, "batch_size": 4},
            "output": str(tmp / "hospital-a"),
            "privacy": {"require_dp": False, "epsilon": 10.0, "min_images": 2,
                        "ledger": str(tmp / "hospital-a" / "privacy-ledger.json")},
            "state": str(tmp / "hospital-a" / "state"),
            "connection": {"superlink": f"127.0.0.1:{port}", "root_certificates": str(certs / "ca.crt"),
                           "auth_key": str(certs / "hospital-a.key")}}
    run_yaml = _write(tmp / "run.yaml", server)
    initialise(tmp / "hospital-a" / "state", "hospital-a", tmp / "hospital-a" / "privacy-ledger.json")  # site init
    (tmp / "state").mkdir()
    home = tmp / "flwr-home"
    home.mkdir()
    log = open(tmp / "superlink.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "tba_fed.cli", "superlink", str(run_yaml)], env=flower_env(home),
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_registered(process, f"127.0.0.1:{port}", certs, tmp / "superlink.log")
        yield {"tmp": tmp, "certs": certs, "server": server, "site": site, "port": port, "run_yaml": run_yaml}
    finally:
        stop_process(process)
        log.close()


def _wait_registered(process, address, certs, log, timeout=120.0):
    """Until `tba-fed superlink` has registered hospital-a's key (it does so once TLS is up)."""
    key = public_key_to_bytes(load_auth_public_key(certs / "hospital-a.key.pub", "key"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"tba-fed superlink exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if any(node.public_key == key for node in registered_nodes(address, certs / "ca.crt")):
                return
        except Exception:  # not serving yet
            pass
        time.sleep(0.5)
    pytest.fail(f"hospital-a was not registered within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _variant(setup, label: str, kind: str, **changes) -> Path:
    """A copy of the good site or server YAML with dotted keys changed."""
    config = yaml.safe_load(yaml.safe_dump(setup[kind]))
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return _write(setup["tmp"] / f"{label}.yaml", config)


def _lines(path: Path, **kwargs) -> list[str]:
    return [check.line() for check in preflight(path, **kwargs)]


def _problems(path: Path, **kwargs) -> list[str]:
    return [line for line in _lines(path, **kwargs) if line.startswith("PROBLEM")]


def _certificate(path: Path, not_before: dt.datetime, not_after: dt.datetime) -> Path:
    """A self-signed CA certificate with the given validity (cryptography, as an operator's CA would be)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_good_site_and_server_pass(setup, capsys):
    site_lines = _lines(setup["tmp"] / _write(setup["tmp"] / "site.yaml", setup["site"]))
    assert not [line for line in site_lines if line.startswith("PROBLEM")], site_lines
    fields = {line.split()[1].rstrip(":") for line in site_lines if line.startswith("OK")}
    assert fields == {"config", "profile", "connection.root_certificates", "connection.auth_key", "connection.superlink",
                      "model.sha256", "data", "data.images", "privacy", "privacy.ledger", "output"}
    assert "OK      data.images: 40 PNG 8-bit colour images, values 0..115 of full scale 0..255" in site_lines
    data = [line for line in site_lines if line.startswith("OK      data: ")]
    counts = re.fullmatch(r"OK      data: (\d+) calibration and (\d+) held-out images read \(min_images 2 each\)", data[0])
    assert counts is not None and int(counts[1]) + int(counts[2]) == 40, data  # each image used, as one or the other
    assert any(line.startswith("OK      connection.auth_key: hospital-a registered as node ") for line in site_lines)
    server_lines = _lines(setup["run_yaml"])
    assert not [line for line in server_lines if line.startswith("PROBLEM")], server_lines
    port = setup["port"]
    assert f"OK      superlink.node_auth: 127.0.0.1:{port} refuses unregistered SuperNodes" in server_lines
    assert f"OK      superlink.database: {setup['tmp'] / 'state' / 'superlink.db'} holds the SuperLink's state " \
           "(1 registered nodes)" in server_lines
    assert any(line.startswith(f"OK      superlink.port: 127.0.0.1:{port} is served by a SuperLink: ")
               for line in server_lines)
    assert run_preflight(setup["tmp"] / "site.yaml", None, 30.0) == 0  # the CLI command's body: prints, exit code
    assert capsys.readouterr().out.splitlines()[-1] == f"preflight {setup['tmp'] / 'site.yaml'}: all checks passed"


def test_production_server_verifies_the_running_superlink(setup):
    config = load_federated_config(setup["run_yaml"])
    lines = verify_superlink(config)
    assert [line.split()[1] for line in lines] == ["superlink.certificates:", "superlink.node_auth:",
                                                   "superlink.database:"]
    elsewhere = _variant(setup, "other-db", "server", **{"superlink.database": str(setup["tmp"] / "other.db")})
    with pytest.raises(TBAInputError) as err:
        verify_superlink(load_federated_config(elsewhere))
    assert str(err.value) == (f"superlink.database: production run refused: {setup['tmp'] / 'other.db'} does not exist: "
                              f"the SuperLink at 127.0.0.1:{setup['port']} does not keep its state there "
                              "(start the SuperLink with tba-fed superlink RUN.yaml)")


def test_expired_and_soon_expiring_certificates(setup):
    now = dt.datetime.now(dt.timezone.utc)
    expired = _certificate(setup["tmp"] / "expired-ca.crt", now - dt.timedelta(days=400), now - dt.timedelta(days=35))
    path = _variant(setup, "expired", "site", **{"connection.root_certificates": str(expired)})
    problems = _problems(path)
    assert problems[0] == (f"PROBLEM connection.root_certificates: {expired} expired on "
                           f"{(now - dt.timedelta(days=35)):%Y-%m-%d} (fix: {RENEW})")
    assert problems[1].startswith(f"PROBLEM connection.superlink: cannot reach 127.0.0.1:{setup['port']} over TLS "
                                  "(certificate not accepted: ")
    soon_end = now + dt.timedelta(days=10, hours=1)
    soon = _certificate(setup["tmp"] / "soon-ca.crt", now - dt.timedelta(days=1), soon_end)
    path = _variant(setup, "soon", "site", **{"connection.root_certificates": str(soon)})
    assert _problems(path)[0] == (f"PROBLEM connection.root_certificates: {soon} expires on {soon_end:%Y-%m-%d}, in 10 "
                                  f"days (less than 30) (fix: {RENEW})")
    assert not [p for p in _problems(path, expiry_days=5) if "root_certificates" in p]  # 10 days left > 5


def test_wrong_keys(setup):
    tmp, certs = setup["tmp"], setup["certs"]
    key = tmp / "mixed.key"
    shutil.copy(certs / "hospital-a.key", key)
    shutil.copy(certs / "hospital-b.key.pub", f"{key}.pub")
    assert _problems(_variant(setup, "mixed", "site", **{"connection.auth_key": str(key)}))[0] == (
        f"PROBLEM connection.auth_key: {key}.pub does not match {key} (fix: put the .pub generated with this key beside "
        "it; the SuperLink must register that one)")
    other = tmp / "other.key"
    other.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    assert _problems(_variant(setup, "other-key", "server", **{"superlink.certificates.keyfile": str(other)})) == [
        f"PROBLEM superlink.certificates.keyfile: {other} is not the key of {certs / 'server.pem'} "
        "(fix: give the key the certificate was issued for)"]


def test_unregistered_keys(setup):
    certs, port = setup["certs"], setup["port"]
    site = _variant(setup, "hospital-b", "site", name="hospital-b", **{"connection.auth_key": str(certs / "hospital-b.key")})
    fix = ("flwr supernode register {} <connection>, or restart tba-fed superlink, which registers every key under "
           "superlink.sites")
    pub = certs / "hospital-b.key.pub"
    assert _problems(site) == [f"PROBLEM connection.auth_key: the key of hospital-b ({pub}) is not registered at "
                               f"127.0.0.1:{port} (fix: {fix.format(pub)})"]
    server = _variant(setup, "only-b", "server", **{"superlink.sites": {"hospital-b": str(pub)}})
    problems = _problems(server)
    assert problems[0] == (f"PROBLEM superlink.sites.hospital-b: the key of hospital-b ({pub}) is not registered at "
                           f"127.0.0.1:{port} (fix: {fix.format(pub)})")
    assert problems[1].startswith("PROBLEM superlink.sites: node ")  # hospital-a: registered, but no longer listed
    assert problems[1].endswith("(hospital-a) is registered but its key is not under superlink.sites (fix: flwr "
                                f"supernode unregister {problems[1].split()[3]} <connection>, or list its key)")


def test_data_problems(setup):
    tmp = setup["tmp"]
    few = _problems(_variant(setup, "few", "site", **{"privacy.min_images": 40}))  # no part can hold all 40 images
    assert len(few) == 1 and re.fullmatch(
        r"PROBLEM data: \d+ calibration and \d+ held-out images; every part a release summarises needs the privacy "
        r"policy's min_images \(40\) \(fix: add images \(data.path\), raise data.sample_rate, adjust "
        r"data.holdout_fraction, or lower privacy.min_images\)", few[0]), few
    broken = tmp / "broken-images"
    shutil.copytree(setup["site"]["data"]["path"], broken)
    (broken / "b" / "3.png").write_bytes(b"not an image")
    problems = _problems(_variant(setup, "broken", "site", **{"data.path": str(broken)}))
    bad = broken / "b" / "3.png"
    assert problems == [f"PROBLEM data.path: {bad} cannot be read as an image (cannot identify image file '{bad}') "
                        "(fix: remove or replace the file)"]
    missing = tmp / "no-such-folder"
    assert _problems(_variant(setup, "missing", "site", **{"data.path": str(missing)})) == [
        f"PROBLEM data.path: {missing} is not a directory (fix: give a folder with one sub-folder of images per class, "
        "or a flat folder of images (unlabeled))"]


def test_checksum_mismatch_at_preflight_and_at_load(setup):
    wrong = "0" * 64
    checkpoint = setup["site"]["model"]["checkpoint"]
    actual = setup["site"]["model"]["sha256"]
    expected = f"{checkpoint} has sha256 {actual}, the config records {wrong}"
    assert _problems(_variant(setup, "bad-sum", "site", **{"model.sha256": wrong})) == [
        f"PROBLEM model.sha256: {expected} (fix: restore the checkpoint the run was set up with)"]
    with pytest.raises(TBAInputError, match=f"^model.sha256: {expected} "):  # every machine that loads it refuses
        create_model(ModelConfig.model_validate({**setup["site"]["model"], "sha256": wrong}))
    unpinned = {k: v for k, v in setup["site"]["model"].items() if k != "sha256"}
    assert _problems(_variant(setup, "unpinned", "site", model=unpinned)) == [
        f"PROBLEM model.sha256: {checkpoint} is not pinned by a checksum (fix: add model.sha256: {actual})"]
    without = _write(setup["tmp"] / "no-model.yaml", {k: v for k, v in setup["site"].items() if k != "model"})
    assert _problems(without) == [  # such a site would serve any model a run names
        "PROBLEM model: the site YAML has no model section: the site would serve whatever model a run names, and its "
        "weights cannot be checked nor its images read through the model's preprocessing (fix: add the run's model "
        "section (name, kwargs, checkpoint, sha256): the site then serves only that model)"]


def test_unwritable_directories_and_torn_ledger(setup):
    tmp = setup["tmp"]
    blocker = tmp / "a-file"
    blocker.write_text("not a directory")
    fresh = tmp / "unwritable-state"  # a site whose ledger cannot be written cannot be initialised either
    problems = _problems(_variant(setup, "unwritable", "site", output=str(blocker / "out"), state=str(fresh),
                                  **{"privacy.ledger": str(blocker / "ledger" / "ledger.json")}))
    assert problems == [f"PROBLEM state: {fresh} holds no initialised site state: this site makes no release (fix: run "
                        "`tba-fed site init DIR` once on this machine (docs/deployment.md §3))",
                        f"PROBLEM privacy.ledger: {blocker / 'ledger'} is not writable (Not a directory: {blocker}) "
                        f"(fix: {WRITABLE})",
                        f"PROBLEM output: {blocker / 'out'} is not writable (Not a directory: {blocker}) (fix: {WRITABLE})"]
    earlier = tmp / "earlier-output"
    (earlier / "old.txt").parent.mkdir()
    (earlier / "old.txt").write_text("an earlier result")
    assert _problems(_variant(setup, "earlier", "server", output=str(earlier))) == [
        f"PROBLEM output: {earlier} already exists (fix: pass --overwrite (overwrite: true) or choose another path)"]
    torn = tmp / "torn" / "ledger.json"
    initialise(tmp / "torn" / "state", "hospital-a", torn)  # an initialised site whose ledger was torn since
    torn.write_text('{"format": "tba-fed privacy ledger 1", "entries": [{"run_id"')
    problems = _problems(_variant(setup, "torn", "site", state=str(tmp / "torn" / "state"),
                                  **{"privacy.ledger": str(torn)}))
    assert len(problems) == 1 and problems[0].startswith(f"PROBLEM privacy.ledger: {torn} is unreadable (")
    assert problems[0].endswith("refusing to release anything (fix: restore the ledger from backup; never delete it to "
                                "reset a budget)")


def test_unreachable_superlink_and_cli_exit_code(setup, capsys):
    port = free_port()
    path = _variant(setup, "unreachable", "site", **{"connection.superlink": f"127.0.0.1:{port}"})
    assert _problems(path) == [f"PROBLEM connection.superlink: cannot reach 127.0.0.1:{port} over TLS (Connection "
                               f"refused) (fix: {REACH})"]
    assert "NOTE    connection.auth_key: registration not checked: the SuperLink is unreachable" in _lines(path)
    assert run_preflight(path, "site", 30.0) == 1
    assert capsys.readouterr().out.splitlines()[-1] == f"preflight {path}: 1 problem(s)"


def test_secure_run_that_cannot_survive_a_dropout_gets_a_note(setup):
    """Under secure aggregation SecAgg+ unmasks no sum over fewer than min_sites sites (issue #12, A4): with
    min_sites = num_sites one dropout ends the run, and preflight says so before the run starts."""
    secure = {"epsilon": 1.0, "aggregation": "secure"}
    tight = _variant(setup, "secure-tight", "server", privacy=secure, federation={"num_sites": 3, "min_sites": 3})
    assert ("NOTE    federation.min_sites: the noise is split over min_sites = 3 sites and SecAgg+ may unmask no sum "
            "over fewer, so with 3 sites one dropout in the secure round ends the run (fix: to survive one dropout, run "
            "one site more than min_sites)") in _lines(tight)
    spare = _variant(setup, "secure-spare", "server", privacy=secure, federation={"num_sites": 4, "min_sites": 3})
    assert not [line for line in _lines(spare) if "federation.min_sites" in line]
