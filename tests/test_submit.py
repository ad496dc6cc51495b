"""``tba-fed submit``: the connection derived from the run YAML and written to Flower's own config file
(other entries kept, a clash refused, atomically, nothing with --print), the flwr run command, the
profile's refusals, and a submission to a SuperLink that is not there. The run through a real TLS and
node-auth deployment is in tests/test_deployment.py."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
import tomli
import yaml

from tba_fed import TBAInputError
from tba_fed import fileio
from tba_fed.cli import main
from tba_fed.deploy.flower_connection import connect
from tba_fed.deploy.processes import executable, free_port
from tba_fed.deploy.submit import SubmitError, plan_submission, submit
from tba_fed.federation.flower_internals import read_flower_connection

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
MODEL = {"name": "vit_tiny_patch16_224", "kwargs": TINY}
EXISTING = """# my own connections
[superlink]
default = "local"

[superlink.local]
address = ":local:"
options.num-supernodes = 10

[superlink.lab]
address = "lab.example.org:9093"
root-certificates = "/etc/lab/ca.crt"
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("submit") / "certs"
    subprocess.run(["bash", str(REPO / "scripts/make-certificates.sh"), str(folder), "127.0.0.1", "hospital-a"],
                   check=True, capture_output=True)
    return folder


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private FLWR_HOME, as `flwr` and tba-fed find it."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    return tmp_path / "flwr-home"


def _run(tmp: Path, certs: Path, port: int = 9092, **changes) -> Path:
    superlink = {"address": "127.0.0.1", "port": port,
                 "certificates": {"certfile": str(certs / "server.pem"), "keyfile": str(certs / "server.key"),
                                  "ca_certfile": str(certs / "ca.crt")},
                 "database": str(tmp / "superlink.db"), "sites": {"hospital-a": str(certs / "hospital-a.key.pub")}}
    config = {"model": MODEL, "plan": "1->2", "output": str(tmp / "server-out"), "superlink": superlink}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        target = config[section] if field else config
        target.pop(field or section) if value is None else target.__setitem__(field or section, value)
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _entry(certs: Path, port: int = 9092) -> dict:
    return {"address": f"127.0.0.1:{port}", "root-certificates": str(certs / "ca.crt")}


def test_print_shows_the_connection_and_the_command_and_writes_nothing(tmp_path, certs, home, capsys):
    run = _run(tmp_path, certs)
    assert main(["submit", str(run), "--print"]) == 0
    assert capsys.readouterr().out == (
        f"# adds to {home / 'config.toml'}:\n[superlink.hospitals]\naddress = \"127.0.0.1:9092\"\n"
        f"root-certificates = \"{certs / 'ca.crt'}\"\n\n"
        f"{executable('flwr')} run {REPO} hospitals --stream --run-config 'config-path=\"{run}\"'\n")
    assert not home.exists()


def test_command_is_flwr_run_of_the_app_with_the_absolute_run_yaml(tmp_path, certs, home, monkeypatch):
    _run(tmp_path, certs)
    monkeypatch.chdir(tmp_path)
    sub = plan_submission(Path("run.yaml"), connection="coordinator", stream=False)
    assert sub.command == [executable("flwr"), "run", str(REPO), "coordinator", "--run-config",
                           f'config-path="{tmp_path / "run.yaml"}"']
    assert (sub.link.entry, sub.link.path, sub.link.adds) == (_entry(certs), home / "config.toml", True)


def test_connection_is_added_beside_every_other_entry_and_flower_reads_it(tmp_path, certs, home):
    home.mkdir()
    (home / "config.toml").write_text(EXISTING)
    sub = plan_submission(_run(tmp_path, certs, port=9200))
    assert sub.link.adds and connect(sub.link)
    expected = tomli.loads(EXISTING)
    expected["superlink"]["hospitals"] = _entry(certs, 9200)
    assert tomli.loads((home / "config.toml").read_text()) == expected
    assert "#" not in (home / "config.toml").read_text()  # re-serialised as plain TOML
    conn = read_flower_connection("hospitals")  # with the reader `flwr run . hospitals` uses
    assert (conn.address, conn.root_certificates, conn.insecure) == ("127.0.0.1:9200", str(certs / "ca.crt"), False)
    assert read_flower_connection("lab").address == "lab.example.org:9093"


def test_a_missing_config_file_starts_from_flowers_default(tmp_path, certs, home):
    sub = plan_submission(_run(tmp_path, certs))
    assert connect(sub.link)
    config = tomli.loads((home / "config.toml").read_text())
    assert config["superlink"]["default"] == "local" and config["superlink"]["local"] == {"address": ":local:"}
    assert config["superlink"]["hospitals"] == _entry(certs)


def test_the_same_connection_is_kept_and_the_file_untouched(tmp_path, certs, home):
    home.mkdir()
    same = f'{EXISTING}\n[superlink.hospitals]\naddress = "127.0.0.1:9092"\nroot-certificates = "{certs}/./ca.crt"\n' \
           'insecure = false\n'
    (home / "config.toml").write_text(same)
    stat = (home / "config.toml").stat()
    sub = plan_submission(_run(tmp_path, certs))
    assert not sub.link.adds and not connect(sub.link)
    assert (home / "config.toml").read_text() == same and (home / "config.toml").stat().st_mtime_ns == stat.st_mtime_ns


def test_a_connection_of_that_name_pointing_elsewhere_is_refused(tmp_path, certs, home, capsys):
    home.mkdir()
    clash = f'{EXISTING}\n[superlink.hospitals]\naddress = "old.example.org:9092"\n'
    (home / "config.toml").write_text(clash)
    expected = (f"--connection: the Flower connection [superlink.hospitals] in {home / 'config.toml'} points elsewhere "
                "than this run's superlink section: address is 'old.example.org:9092' there, '127.0.0.1:9092' for this "
                f"run; root-certificates is absent there, '{certs / 'ca.crt'}' for this run (pass --connection with a "
                "new name (tba-fed connect adds it), or correct or remove [superlink.hospitals] in "
                f"{home / 'config.toml'})")
    with pytest.raises(TBAInputError) as err:
        plan_submission(_run(tmp_path, certs))
    assert str(err.value) == expected
    assert main(["submit", str(tmp_path / "run.yaml")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"tba-fed: error: {expected}")
    assert (home / "config.toml").read_text() == clash


def test_the_write_is_atomic(tmp_path, certs, home, monkeypatch):
    home.mkdir()
    (home / "config.toml").write_text(EXISTING)
    sub = plan_submission(_run(tmp_path, certs))

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        connect(sub.link)
    assert (home / "config.toml").read_text() == EXISTING and sorted(p.name for p in home.iterdir()) == ["config.toml"]


@pytest.mark.parametrize("changes,expected", [
    ({"superlink__certificates": None},
     "superlink.certificates: the production profile needs TLS (set certfile, keyfile and ca_certfile "
     "(scripts/make-certificates.sh writes them), or set profile: development for a simulation or a local test)"),
    ({"output": "server-out"},
     "output: server-out is relative: the ServerApp would resolve it against its own working directory, not this one "
     "(give an absolute path, e.g. /srv/tba-fed/server-out)"),
])
def test_bad_run_yaml_exits_2_and_writes_nothing(tmp_path, certs, home, capsys, changes, expected):
    assert main(["submit", str(_run(tmp_path, certs, **changes)), "--print"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"tba-fed: error: {expected}")
    assert not home.exists()


def test_missing_ca_and_bad_names_and_bad_toml_are_refused(tmp_path, certs, home):
    run = _run(tmp_path, certs)
    with pytest.raises(TBAInputError, match=r"^--connection: 'a b' cannot name a Flower connection \(use letters"):
        plan_submission(run, connection="a b")
    with pytest.raises(TBAInputError, match=r"^--connection: 'default' cannot name"):
        plan_submission(run, connection="default")
    home.mkdir()
    (home / "config.toml").write_text("[superlink\n")
    with pytest.raises(TBAInputError, match=rf"^FLWR_HOME: {home / 'config.toml'} is not valid TOML \(.*\) \(correct it"):
        plan_submission(run)
    with pytest.raises(TBAInputError, match=r"^superlink.certificates.ca_certfile: cannot read .*missing.crt"):
        plan_submission(_run(tmp_path, certs, superlink__certificates={
            "certfile": str(certs / "server.pem"), "keyfile": str(certs / "server.key"),
            "ca_certfile": str(tmp_path / "missing.crt")}))


def test_development_without_tls_is_an_insecure_connection(tmp_path, certs, home):
    sub = plan_submission(_run(tmp_path, certs, profile="development", superlink__certificates=None,
                               superlink__node_auth=False))
    assert sub.link.entry == {"address": "127.0.0.1:9092", "insecure": True}


@pytest.mark.slow  # flwr run, a real Flower process
def test_no_superlink_there_fails_with_exit_1_after_adding_the_connection(tmp_path, certs, home):
    sub = plan_submission(_run(tmp_path, certs, port=free_port()))
    out = io.StringIO()
    with pytest.raises(SubmitError, match=r"^flwr run did not start the run \(exit code 1\); see its output above$"):
        submit(sub, out)
    assert "Connection to the SuperLink is unavailable" in out.getvalue()
    assert tomli.loads((home / "config.toml").read_text())["superlink"]["hospitals"] == sub.link.entry
