"""A real deployment on loopback for tests: flower-superlink with TLS, SuperNode authentication and a
``--database``, and one flower-supernode per site reading its own site YAML, the sequence
docs/deployment.md gives to hospitals. Every process is started here and stopped here by its pid; the
SuperLink and any SuperNode can be killed and started again (same port, same database, same key)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from tba_fed import ModelConfig, ViTAdapter, solve_plan
from tba_fed.calibrate import collect_span_stats
from tba_fed.cli import main
from tba_fed.data import build_dataset, calibration_split, make_loader
from tba_fed.federation.config import load_site_config
from tba_fed.deploy.flower_connection import ensure_connection
from tba_fed.deploy.processes import app_directory, flower_env, free_port, local_superlink, stop_process
from tba_fed.federation.site import site_key
from tba_fed.models import create_model
from tba_fed.privacy.policy import RELEASES
from tba_fed.privacy.site_state import initialise

import neighbours as nb
from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITES = ("hospital-a", "hospital-b", "hospital-c")
MODEL = {"name": "vit_tiny_patch16_224", "kwargs": TINY}


def descendants(pid: int) -> set[tuple[int, str]]:
    """Every live process below `pid` (children started by Flower: superexec, serverapp, clientapp), as
    (pid, start time) so a reused pid is not mistaken for the same process."""
    parents: dict[int, list[tuple[int, str]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append((int(stat.parent.name), fields[19]))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child[0])
    return found


def alive(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Those of `processes` still running (same pid, same start time, not a zombie)."""
    left = set()
    for pid, started in processes:
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if fields[19] == started and fields[0] != "Z":
                left.add((pid, started))
    return left


class Cluster:
    """The SuperLink and the SuperNodes of `sites`; `site_data` overrides a site's data section. With `kits`, each
    site is made as a hospital makes it (`tba-fed site init` with its own key pair, 24 small images in a folder):
    the coordinator's certificates hold no site key, and it registers the public keys the kits wrote."""

    def __init__(self, tmp: Path, sites=SITES, site_data: dict[str, dict] | None = None,
                 isolation: str = "subprocess", kits: bool = False) -> None:
        self.tmp, self.sites, self.isolation = tmp, tuple(sites), isolation
        self.home = tmp / "flwr-home"
        self.home.mkdir()
        self.certs = tmp / "certs"
        subprocess.run(["bash", str(REPO / "scripts/make-certificates.sh"), str(self.certs), "127.0.0.1",
                        *(() if kits else self.sites)], check=True, capture_output=True)
        self.port = free_port()
        ensure_connection(self.home / "config.toml", "hospitals",
                          {"address": f"127.0.0.1:{self.port}", "root-certificates": str(self.certs / "ca.crt")})
        self.env = flower_env(self.home)
        self.started: set[tuple[int, str]] = set()  # every Flower process seen, for the check that all are gone
        self.superlink: subprocess.Popen | None = None
        self.superexec: subprocess.Popen | None = None
        self._superlink_stack = contextlib.ExitStack()
        self.superlink_starts = 0
        self.nodes: dict[str, dict] = {}
        for seed, name in enumerate(self.sites, start=1):
            port = free_port()
            if kits:
                self.nodes[name] = self._kit(name, seed, port)
                continue
            # each image held out with probability 0.5 by its own hash under the site's secret key: fewer than 2
            # images in a part (refused by min_images) has probability 3e-6
            data = {"source": "synthetic", "num_images": 24, "seed": seed, "batch_size": 8, "holdout_fraction": 0.5,
                    **(site_data or {}).get(name, {})}
            policy = {"require_dp": False, "epsilon": 20.0, "min_images": 2, "releases": list(RELEASES),
                      "ledger": str(tmp / name / "privacy-ledger.json")}
            connection = {"superlink": f"127.0.0.1:{self.port}", "root_certificates": str(self.certs / "ca.crt"),
                          "auth_key": str(self.certs / f"{name}.key"), "port": port}
            site_yaml = tmp / f"{name}.yaml"
            site_yaml.write_text(yaml.safe_dump({"name": name, "model": MODEL, "data": data, "output": str(tmp / name),
                                                 "privacy": policy, "connection": connection,
                                                 "state": str(tmp / name / "state")}))
            initialise(tmp / name / "state", name, tmp / name / "privacy-ledger.json")  # tba-fed site init
            self.nodes[name] = {"yaml": site_yaml, "log": tmp / f"{name}.log", "port": port, "process": None,
                                "key": self.certs / f"{name}.key"}
        # the production profile's description of this SuperLink, which the ServerApp checks before round 1
        self.superlink_config = {
            "address": "127.0.0.1", "host": "127.0.0.1", "port": self.port, "database": str(self.home / "superlink.db"),
            "certificates": {"certfile": str(self.certs / "server.pem"), "keyfile": str(self.certs / "server.key"),
                             "ca_certfile": str(self.certs / "ca.crt")},
            "sites": {name: str(node["key"]) + ".pub" for name, node in self.nodes.items()}}
        self.start_superlink()
        for name, node in self.nodes.items():
            subprocess.run([str(BIN / "flwr"), "supernode", "register", f"{node['key']}.pub", "hospitals", "--name", name],
                           env=self.env, check=True, capture_output=True)
            self.start_node(name)

    def _kit(self, name: str, seed: int, port: int) -> dict:
        """Site `name` made by `tba-fed site init` in tmp/name from a folder of 24 images: its key pair made there."""
        images = nb.write_source("image_folder", self.tmp / f"{name}-images", nb.ordinary(24, seed=seed))["path"]
        kit = self.tmp / name
        # each image held out with probability 0.5 by its own hash under the kit's secret key: fewer than 2 images
        # in a part (refused by min_images) has probability 3e-6
        flags = ["--name", name, "--superlink", f"127.0.0.1:{self.port}", "--ca", str(self.certs / "ca.crt"),
                 "--data", images, "--model", MODEL["name"], *[f"--model-arg={k}={v}" for k, v in MODEL["kwargs"].items()],
                 "--epsilon", "20", "--min-images", "2", "--releases", *RELEASES, "--min-noise-sites", "2",
                 "--holdout-fraction", "0.5", "--batch-size", "8", "--port", str(port)]
        assert main(["site", "init", str(kit), *flags]) == 0
        return {"yaml": kit / "site.yaml", "log": self.tmp / f"{name}.log", "port": port, "process": None,
                "key": kit / "keys" / f"{name}.key"}

    def start_superlink(self) -> subprocess.Popen:
        """The SuperLink on the cluster's port with its database (the same file after a restart)."""
        log = self.home / "superlink.log"
        if log.exists():  # local_superlink rewrites the log: keep the previous life's
            log.rename(self.home / f"superlink-{self.superlink_starts}.log")
        self.superlink_starts += 1
        self.superlink = self._superlink_stack.enter_context(
            local_superlink(self.home, self.port, certificates=self.certs, node_auth=True, isolation=self.isolation))
        if self.isolation == "process" and self.superexec is None:  # the ServerApps' launcher, outliving SuperLink restarts
            with open(self.home / "superexec.log", "w") as handle:
                self.superexec = subprocess.Popen(
                    [str(BIN / "flower-superexec"), "--runtime-api-address", f"127.0.0.1:{self.port}",
                     "--root-certificates", str(self.certs / "ca.crt")], env=self.env, stdout=handle, stderr=subprocess.STDOUT)
        return self.superlink

    def stop_superlink(self, sig: int = signal.SIGTERM, timeout: float = 120) -> None:
        """Send `sig` to the SuperLink and wait for it to exit (SIGKILL if it does not in `timeout`)."""
        self.remember()
        self.superlink.send_signal(sig)
        try:
            self.superlink.wait(timeout)
        finally:
            self._superlink_stack.close()

    def superlink_log(self) -> str:
        return "".join(p.read_text() for p in sorted(self.home.glob("superlink*.log")))

    def start_node(self, name: str) -> subprocess.Popen:
        """Site `name`'s SuperNode with its own key and site YAML (a restart appends to its log)."""
        node = self.nodes[name]
        with open(node["log"], "a") as handle:
            node["process"] = subprocess.Popen(
                [str(BIN / "flower-supernode"), "--root-certificates", str(self.certs / "ca.crt"),
                 "--superlink", f"127.0.0.1:{self.port}", "--port", str(node["port"]),
                 "--auth-supernode-private-key", str(node["key"]),
                 "--node-config", f'site-config="{node["yaml"]}"'], env=self.env, stdout=handle, stderr=subprocess.STDOUT)
        return node["process"]

    def stop_node(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        self.remember()
        process = self.nodes[name]["process"]
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(process)

    def run_yaml(self, name: str, config: dict) -> Path:
        """A run YAML for this cluster's SuperLink (output in tmp/name)."""
        run = self.tmp / f"{name}.yaml"
        base = {"model": MODEL, "output": str(self.tmp / name), "superlink": self.superlink_config}
        run.write_text(yaml.safe_dump({**base, **config}))
        return run

    def run(self, name: str, config: dict) -> subprocess.Popen:
        """`flwr run --stream` of a run YAML (output in tmp/name); its log on stdout, as text."""
        return subprocess.Popen([str(BIN / "flwr"), "run", str(app_directory()), "hospitals", "--stream",
                                 "--run-config", f'config-path="{self.run_yaml(name, config)}"'], env=self.env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def submit(self, name: str, config: dict, *flags: str) -> subprocess.Popen:
        """`tba-fed submit` of a run YAML (what the runbook gives the coordinator); its output on stdout, as text."""
        return subprocess.Popen([sys.executable, "-m", "tba_fed.cli", "submit", str(self.run_yaml(name, config)), *flags],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def flwr_json(self, *args: str) -> dict:
        """A `flwr` CLI command against this SuperLink, with --format json."""
        done = subprocess.run([str(BIN / "flwr"), *args, "hospitals", "--format", "json"], env=self.env,
                              capture_output=True, text=True, timeout=120)
        return json.loads(done.stdout)

    def online_nodes(self) -> set[int]:
        return {int(n["node-id"]) for n in self.flwr_json("supernode", "list")["nodes"] if n["status"] == "online"}

    def run_status(self, run_id: int) -> tuple[str, str]:
        run = self.flwr_json("ls", "--run-id", str(run_id))["runs"][0]
        return run["status"], run["status-details"]

    def remember(self) -> None:
        """Note every process below ours now, before a kill orphans it."""
        for process in [self.superlink, self.superexec, *(n["process"] for n in self.nodes.values())]:
            if process is not None and process.poll() is None:
                self.started |= {(process.pid, Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])}
                self.started |= descendants(process.pid)

    def close(self) -> None:
        """Stop every SuperNode, then the SuperLink, by the pids started here."""
        with contextlib.suppress(OSError, IndexError):
            self.remember()
        for node in self.nodes.values():
            if node["process"] is not None:
                stop_process(node["process"])
        if self.superexec is not None:
            stop_process(self.superexec)
        self._superlink_stack.close()

    def centralised(self, sites, plan):
        """The maps solved on the pooled calibration images of `sites` (what the federation must equal), and
        the batches."""
        model = create_model(ModelConfig.model_validate(MODEL))
        batches = []
        for name in sites:
            site = load_site_config(self.nodes[name]["yaml"])
            calibration, _ = calibration_split(build_dataset(site.data, model), site.data, site_key(site))
            batches += list(make_loader(calibration, site.data))
        return solve_plan(collect_span_stats(ViTAdapter(model), batches, plan.spans), bias=True), batches


def assert_maps_equal(folder: Path, central) -> None:
    maps = load_file(str(folder / "maps.safetensors"))
    for span, fit in central.items():
        for name, expected in (("weight", fit.map.weight), ("bias", fit.map.bias)):
            got = maps[f"span.{span.key}.{name}"]
            assert float((got - expected).norm() / expected.norm()) < 1e-9


def wait_gone(processes: set[tuple[int, str]], timeout: float) -> set[tuple[int, str]]:
    """Wait up to `timeout` for `processes` to exit; return those still running."""
    deadline = time.monotonic() + timeout
    while (left := alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def run_id(log: list[str]) -> int:
    """The run id `flwr run` printed ("Successfully started run ...")."""
    return next(int(line.split()[-1]) for line in log if "Successfully started run" in line)


def wait_for_line(run: subprocess.Popen, text: str, seen: list[str]) -> None:
    """Read the run's streamed log until a line contains `text` (the lines land in `seen`)."""
    for line in run.stdout:
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"the run's log never showed {text!r}:\n" + "".join(seen[-40:]))

