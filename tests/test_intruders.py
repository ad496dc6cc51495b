"""Intruders at the network edge of a production deployment (issue #16), end to end on loopback: the real
SuperLink (TLS, SuperNode authentication, a database) and three hospitals' SuperNodes from tests/cluster.py,
and three intruders during one run:

- a SuperNode whose key was never registered (its own CA is the coordinator's, so TLS succeeds);
- a SuperNode whose key is registered but that trusts another CA (so it cannot verify the SuperLink);
- a client presenting hospital-a's public key while signing with its own private key, which asks again
  and again, for the whole run, to activate that node and to pull hospital-a's messages.

Each is refused (its own log says so) and the run completes among the three hospitals, none of the
intruders ever online and nothing written by them: each has a complete, initialised site (YAML, state,
ledger) that would have recorded any request in its audit log, ledger or output. test_profile.py checks
that a production ServerApp refuses a SuperLink that does not authenticate SuperNodes (with a throwaway
key); test_preflight.py that preflight reports unregistered keys; neither runs an intruder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tba_fed.audit import check_chain
from tba_fed.deploy.certificates import load_auth_public_key
from tba_fed.federation.flower_internals import public_key_to_bytes
from tba_fed.deploy.flower_control import registered_nodes
from tba_fed.deploy.processes import free_port, stop_process
from tba_fed.privacy.ledger import PrivacyLedger
from tba_fed.privacy.site_state import initialise

from cluster import BIN, MODEL, REPO, SITES, Cluster

pytestmark = pytest.mark.slow  # a real SuperLink and SuperNodes on loopback

ROGUE = ("mallory", "hospital-d")  # keys from another CA: mallory's never registered, hospital-d's registered


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    deployment = Cluster(tmp_path_factory.mktemp("intruders"))
    try:
        rogue = deployment.tmp / "rogue"
        subprocess.run(["bash", str(REPO / "scripts/make-certificates.sh"), str(rogue), "127.0.0.1", *ROGUE], check=True,
                       capture_output=True)
        subprocess.run([str(BIN / "flwr"), "supernode", "register", str(rogue / "hospital-d.key.pub"), "hospitals"],
                       env=deployment.env, check=True, capture_output=True)
        yield deployment
    finally:
        deployment.close()


def _intruder_site(cluster: Cluster, name: str) -> Path:
    """A complete production site of the intruder's own (initialised state, ledger): any request it were sent
    would leave an entry in its audit log and ledger, or an installed model in its output."""
    folder = cluster.tmp / name
    site = {"name": name, "model": MODEL, "output": str(folder / "out"), "state": str(folder / "state"),
            "data": {"source": "synthetic", "num_images": 24, "seed": 9, "batch_size": 8, "holdout_fraction": 0.5},
            "privacy": {"require_dp": False, "epsilon": 20.0, "min_images": 2, "ledger": str(folder / "ledger.json")}}
    path = cluster.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(site))
    initialise(folder / "state", name, folder / "ledger.json")
    return path


def _supernode(cluster: Cluster, name: str, ca: Path, key: Path) -> subprocess.Popen:
    with open(cluster.tmp / f"{name}.log", "w") as log:
        return subprocess.Popen([str(BIN / "flower-supernode"), "--root-certificates", str(ca),
                                 "--superlink", f"127.0.0.1:{cluster.port}", "--port", str(free_port()),
                                 "--auth-supernode-private-key", str(key),
                                 "--node-config", f'site-config="{_intruder_site(cluster, name)}"'],
                                env=cluster.env, stdout=log, stderr=subprocess.STDOUT)


def _node_of(cluster: Cluster, public_key: Path) -> int:
    """The node id the SuperLink registered for `public_key`."""
    wanted = public_key_to_bytes(load_auth_public_key(public_key, "key"))
    [node] = [n.node_id for n in registered_nodes(f"127.0.0.1:{cluster.port}", cluster.certs / "ca.crt")
              if n.public_key == wanted]
    return node


def test_intruders_are_refused_and_receive_nothing_while_the_hospitals_run(cluster):
    rogue = cluster.tmp / "rogue"
    legitimate = {name: _node_of(cluster, cluster.certs / f"{name}.key.pub") for name in SITES}
    run = cluster.run("with-intruders", {"plan": "1->2",
                                         "federation": {"num_sites": 3, "min_sites": 3, "round_timeout": 300}})
    stop = cluster.tmp / "impostor.stop"
    intruders = {
        "unregistered": _supernode(cluster, "unregistered", cluster.certs / "ca.crt", rogue / "mallory.key"),
        "wrong-ca": _supernode(cluster, "wrong-ca", rogue / "ca.crt", rogue / "hospital-d.key"),
    }
    impostor = subprocess.Popen([sys.executable, str(Path(__file__).with_name("intruder_client.py")),
                                 f"127.0.0.1:{cluster.port}", str(cluster.certs / "ca.crt"), str(rogue / "mallory.key"),
                                 str(cluster.certs / "hospital-a.key.pub"), str(legitimate["hospital-a"]), str(stop)],
                                env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = run.communicate(timeout=600)
        online = cluster.online_nodes()
        stop.touch()
        impostor_out, _ = impostor.communicate(timeout=120)
        codes = {name: process.wait(timeout=120) for name, process in intruders.items()}
    finally:
        for process in (run, impostor, *intruders.values()):
            if process.poll() is None:
                stop_process(process)

    # the run completed among the three hospitals, and only they were ever online
    folder = cluster.tmp / "with-intruders"
    assert (folder / "report.json").is_file(), out[-3000:]
    report = json.loads((folder / "report.json").read_text())
    for rnd in report["federation"]["rounds"]:
        assert sorted(rnd["sites"]) == list(SITES) and {v["status"] for v in rnd["sites"].values()} == {"ok"}, rnd
    assert report["federation"]["sites_connected"] == 3 and online == set(legitimate.values())

    # each intruder was refused, and says so in its own log
    unregistered = (cluster.tmp / "unregistered.log").read_text()
    assert codes["unregistered"] != 0 and "Failed to activate SuperNode" in unregistered, unregistered[-2000:]
    wrong_ca = (cluster.tmp / "wrong-ca.log").read_text()
    assert codes["wrong-ca"] != 0 and "CERTIFICATE_VERIFY_FAILED" in wrong_ca, wrong_ca[-2000:]
    assert impostor.returncode == 0, impostor_out
    assert impostor_out.splitlines() == ['ActivateNode: refused: HTTP 401 {"detail":"Invalid SuperNode authentication"}',
                                         'PullMessages: refused: HTTP 401 {"detail":"Invalid SuperNode authentication"}']
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 401' in cluster.superlink_log()

    # no intruder received a message of the run: no audit log (in its output), no release in its ledger, no
    # installed model, and its log never names the run
    run_id = check_chain(cluster.tmp / "with-intruders.audit.jsonl").entries[0]["run_id"]
    for name in ("unregistered", "wrong-ca"):
        assert not (cluster.tmp / name / "out").exists()
        assert PrivacyLedger(cluster.tmp / name / "ledger.json").entries() == []
        assert run_id not in (cluster.tmp / f"{name}.log").read_text()
    # hospital-a, whose key the impostor presented, served every round of the run itself
    served = [e["round"] for e in check_chain(cluster.tmp / "hospital-a" / "audit.jsonl").entries if e["run_id"] == run_id]
    assert served == ["statistics", "install"]
