"""Twenty hospitals on one machine: a real TLS + authenticated loopback deployment at ViT-B width.

    python benchmarks/scale_deployment.py --out outputs/scale.json      # 20 sites, d=768, replies >= 100 MB, vs 2 sites
    python benchmarks/scale_deployment.py --quick --out /tmp/quick.json # 2 sites, d=64 (the test's run)

One run starts a real ``flower-superlink`` (TLS, ``--enable-supernode-auth``, SQLite ``--database``, as in
docs/deployment.md), registers one key per site, starts the baseline sites' ``flower-supernode`` processes
(each with its own site YAML, synthetic images) and runs the real app with ``flwr run``; then starts the
other sites and runs the full federation over all of them. The model is a random timm ViT at embed_dim
``--dim`` (768: ViT-B width) made cheap for 2 CPU cores (32 px images, 17 tokens, 2 heads); its depth is the
fewest blocks whose plan of one-block spans (1->2, 3->4, ...) makes each site's statistics reply (calibration
and held-out sums: packed Gram, cross, sums per span, ``wire.encode_spans``) at least ``--min-payload-mb``.

Measured in the same run, side by side:
- per round (statistics, install): wall time (the report's), array bytes each way per site, peak RSS of the
  server app (``flwr-serverapp``), the SuperLink, a site's ClientApp (``flwr-clientapp``, the largest of the
  sites') and its SuperNode, sampled from /proc by walking the tree of the processes this script started;
- the federated statistics round against the same sites' statistics computed in this process (compute,
  encode, the server's validation, sum; model loaded once): what the deployment itself costs;
- the full federation against the baseline at the same payload per site: how time and server memory scale.
Correctness: each run's maps must equal the centralised solve on the union of its sites' images to 1e-9
relative, or the script exits non-zero. Everything started is stopped by pid, pass or fail.

Twenty sites sharing one machine is not twenty hospitals: a ClientApp imports torch (~0.5 GB private
memory before any work) and peaks at ~1.4 GB RSS with a 113 MB reply, so twenty at once do not fit in
24 GiB. The SuperNodes therefore run with ``--isolation process`` and ``site_executors.SiteExecutors``
starts their SuperExecs in turn, ``--concurrent-sites`` at a time (see there why not ``nice``); each
site's processes get one OpenMP thread and give large buffers back to the system when freed
(``SITE_ENV``). If the machine's available memory falls below ``--memory-floor-gib`` the Flower apps are
killed and the run fails. The server side (SuperLink, ServerApp) runs with Flower's defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import flwr
import torch
import yaml
from safetensors.torch import load_file

from tba_fed import ModelConfig, ViTAdapter, create_model, parse_plan, solve_plan
from tba_fed.calibrate import collect_span_stats
from tba_fed.data import build_dataset, calibration_split, make_loader
from tba_fed.fileio import atomic_write_text
from tba_fed.federation.config import load_site_config
from tba_fed.deploy.flower_connection import ensure_connection
from tba_fed.deploy.processes import app_directory, flower_env, free_port, local_superlink, stop_process
from tba_fed.federation.site import site_key
from tba_fed.federation.wire import SPLITS, decode_spans, encode_spans, payload_bytes
from tba_fed.plan import Plan
from tba_fed.privacy.site_state import initialise
from tba_fed.stats import SpanStats

from process_memory import MIB, ProcessMonitor, available_kib  # benchmarks/, next to this script
from site_executors import SiteExecutors

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FEDERATION = "hospitals"
TOLERANCE = 1e-9
# Each site holds IMAGES synthetic images, each held out with probability HOLDOUT_FRACTION by the site's own
# random key (production profile), and refuses a release any part of which has fewer than MIN_IMAGES images:
# with these values a site refuses by chance with probability 0.8**40 = 1.3e-4, and 0.8**64 = 6e-7 in --quick
# (tests/test_scale_benchmark.py).
IMAGES, QUICK_IMAGES, HOLDOUT_FRACTION, MIN_IMAGES = 40, 64, 0.2, 1
# Twenty sites share two cores and one allocator's habits: one OpenMP thread each, and buffers of 1 MiB or
# more (5 MiB chunks of a reply) given back to the system when freed instead of kept by glibc's heap.
SITE_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1024 * 1024)}


def plan_text(spans: int) -> str:
    """One-block spans 1->2, 3->4, ...: block 0's output, on random weights, is too ill-conditioned an input
    (condition ~1e8 at 2 sites) for a 1e-9 comparison; from block 1 on it is ~3e6."""
    return ", ".join(f"{2 * i + 1}->{2 * i + 2}" for i in range(spans))


def reply_bytes(dim: int, spans: int) -> int:
    """Exact array bytes of one site's statistics reply for `spans` one-block spans at width `dim`."""
    plan = parse_plan(plan_text(spans), 2 * spans + 1)
    return payload_bytes(encode_spans({split: {s: SpanStats.zeros(dim) for s in plan.spans} for split in SPLITS}))


def plan_for_payload(dim: int, min_bytes: int) -> tuple[str, int, int]:
    """The fewest one-block spans whose reply is at least `min_bytes` (the reply grows linearly per span):
    the plan, the model depth it needs, the exact reply bytes."""
    spans = max(1, math.ceil(min_bytes / reply_bytes(dim, 1)))
    return plan_text(spans), 2 * spans + 1, reply_bytes(dim, spans)


def model_spec(dim: int, depth: int, heads: int) -> dict:
    return {"name": "vit_base_patch16_224",
            "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": dim, "depth": depth, "num_heads": heads,
                       "mlp_ratio": 1.0, "num_classes": 10}}


# ---------------------------------------------------------------- the deployment

@dataclass
class RunResult:
    report: dict
    output: Path
    windows: dict[str, tuple[float, float]]
    started: float
    wall_seconds: float
    log: Path


@dataclass
class Deployment:
    """flower-superlink (TLS, node auth, SQLite) and one flower-supernode per site on loopback."""

    root: Path
    stack: contextlib.ExitStack
    monitor: ProcessMonitor
    images: int
    slots: int  # sites computing at once (site_executors)
    sites: dict[str, Path] = field(default_factory=dict)  # name -> site YAML

    def start(self, names: list[str]) -> None:
        self.home, self.certs = self.root / "flwr-home", self.root / "certs"
        self.home.mkdir()
        subprocess.run(["bash", str(REPO / "scripts/make-certificates.sh"), str(self.certs), "127.0.0.1", *names],
                       check=True, capture_output=True)
        self.port = free_port()
        ensure_connection(self.home / "config.toml", FEDERATION,
                          {"address": f"127.0.0.1:{self.port}", "root-certificates": str(self.certs / "ca.crt")})
        self.env = flower_env(self.home)
        superlink = self.stack.enter_context(local_superlink(self.home, self.port, certificates=self.certs,
                                                             node_auth=True))
        self.monitor.watch(superlink.pid, "superlink")
        self.monitor.database = self.home / "superlink.db"
        self.site_env = {**self.env, **SITE_ENV}
        self.executors = SiteExecutors(self.slots, self.monitor, self.site_env, self.root)
        self.executors.start()
        self.stack.callback(self.executors.close)
        for name in names:
            subprocess.run([str(BIN / "flwr"), "supernode", "register", str(self.certs / f"{name}.key.pub"), FEDERATION],
                           env=self.env, check=True, capture_output=True)
        # the production profile's description of this SuperLink: the ServerApp checks it before round 1
        self.superlink = {"address": "127.0.0.1", "host": "127.0.0.1", "port": self.port,
                          "database": str(self.home / "superlink.db"),
                          "certificates": {"certfile": str(self.certs / "server.pem"),
                                           "keyfile": str(self.certs / "server.key"),
                                           "ca_certfile": str(self.certs / "ca.crt")},
                          "sites": {name: str(self.certs / f"{name}.key.pub") for name in names}}

    def add_sites(self, names: list[str]) -> None:
        for name in names:
            seed = len(self.sites) + 1
            data = {"source": "synthetic", "num_images": self.images, "seed": seed, "batch_size": 16,
                    "holdout_fraction": HOLDOUT_FRACTION}
            policy = {"require_dp": False, "epsilon": 1.0, "min_images": MIN_IMAGES, "releases": ["statistics"],
                      "ledger": str(self.root / name / "privacy-ledger.json")}
            path = self.root / f"{name}.yaml"
            connection = {"superlink": f"127.0.0.1:{self.port}", "root_certificates": str(self.certs / "ca.crt"),
                          "auth_key": str(self.certs / f"{name}.key")}
            path.write_text(yaml.safe_dump({"name": name, "data": data, "output": str(self.root / name),
                                            "privacy": policy, "connection": connection,
                                            "state": str(self.root / name / "state")}))
            initialise(self.root / name / "state", name, self.root / name / "privacy-ledger.json")  # tba-fed site init
            log = self.stack.enter_context(open(self.root / f"{name}.log", "w"))  # noqa: SIM115 - closed by the stack
            runtime = free_port()
            process = subprocess.Popen(
                [str(BIN / "flower-supernode"), "--root-certificates", str(self.certs / "ca.crt"),
                 "--superlink", f"127.0.0.1:{self.port}", "--isolation", "process", "--port", str(runtime),
                 "--auth-supernode-private-key", str(self.certs / f"{name}.key"),
                 "--node-config", f'site-config="{path}"'], env=self.site_env, stdout=log, stderr=subprocess.STDOUT)
            self.stack.callback(stop_process, process)
            self.monitor.watch(process.pid, "supernode", name)
            self.executors.add(name, f"127.0.0.1:{runtime}")
            self.sites[name] = path

    def run(self, name: str, model: dict, plan: str, timeout: float) -> RunResult:
        """`flwr run` of the real app over every site started so far; the rounds' time windows come from the
        server's streamed log (sites connected -> first round; run complete -> end of the last)."""
        output, config = self.root / name, self.root / f"{name}-run.yaml"
        config.write_text(yaml.safe_dump({"model": model, "plan": plan, "output": str(output), "superlink": self.superlink,
                                          "federation": {
            "num_sites": len(self.sites), "min_sites": len(self.sites), "round_timeout": timeout}}))
        log = self.root / f"{name}-server.log"
        start, marks = time.monotonic(), {}
        process = subprocess.Popen([str(BIN / "flwr"), "run", str(app_directory()), FEDERATION, "--stream",
                                    "--run-config", f'config-path="{config}"'], env=self.env, cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.stack.callback(stop_process, process)
        with open(log, "w") as handle:
            for line in process.stdout:
                handle.write(line)
                if "sites connected" in line:
                    marks.setdefault("connected", time.monotonic())
                elif "federated run complete" in line:
                    marks["complete"] = time.monotonic()
        process.wait()
        wall = time.monotonic() - start
        if self.monitor.low_memory:
            raise RuntimeError(f"{name}: {self.monitor.low_memory}")
        report_path = output / "report.json"
        if process.returncode != 0 or not report_path.is_file() or set(marks) != {"connected", "complete"}:
            raise RuntimeError(f"{name}: the run failed (flwr exit {process.returncode}); log {log}:\n"
                               + log.read_text()[-3000:])
        report = json.loads(report_path.read_text())
        rounds = report["federation"]["rounds"]
        first, last = rounds[0], rounds[-1]
        windows = {first["name"]: (marks["connected"], marks["connected"] + first["seconds"]),
                   last["name"]: (marks["complete"] - last["seconds"], marks["complete"])}
        return RunResult(report, output, windows, start, wall, log)


# ---------------------------------------------------------------- the same statistics in this process

def site_loaders(site_yaml: Path, model: torch.nn.Module):
    site = load_site_config(site_yaml)
    calibration, holdout = calibration_split(build_dataset(site.data, model), site.data, site_key(site))
    return make_loader(calibration, site.data), make_loader(holdout, site.data)


def local_statistics(model: torch.nn.Module, sites: list[Path], plan: Plan) -> float:
    """Seconds to do in this process what the sites and the server do in the statistics round, minus Flower:
    each site's sums (calibration and held-out), encoded, decoded and validated as the server does, summed."""
    adapter, start, total = ViTAdapter(model), time.perf_counter(), None
    for site in sites:
        loaders = dict(zip(SPLITS, site_loaders(site, model)))
        stats = {split: collect_span_stats(adapter, loader, plan.spans) for split, loader in loaders.items()}
        decoded = decode_spans(encode_spans(stats), plan.spans, adapter.embed_dim)
        total = decoded if total is None else {split: {span: acc + decoded[split][span] for span, acc in total[split].items()}
                                               for split in SPLITS}
    return time.perf_counter() - start


def max_relative_error(output: Path, model: torch.nn.Module, sites: list[Path], plan: Plan) -> float:
    """The server's maps against the centralised solve on the union of the sites' calibration images."""
    batches = [batch for site in sites for batch in site_loaders(site, model)[0]]
    central = solve_plan(collect_span_stats(ViTAdapter(model), batches, plan.spans), bias=True)
    maps = load_file(str(output / "maps.safetensors"))
    return max(float((maps[f"span.{span.key}.{name}"] - getattr(fit.map, name)).norm() / getattr(fit.map, name).norm())
               for span, fit in central.items() for name in ("weight", "bias"))


# ---------------------------------------------------------------- results

def summarise(result: RunResult, monitor: ProcessMonitor, expected_bytes: int) -> dict:
    rounds = []
    for rnd in result.report["federation"]["rounds"]:
        start, end = result.windows[rnd["name"]]
        sites = rnd["sites"].values()
        if {v["status"] for v in sites} != {"ok"}:
            raise RuntimeError(f"round {rnd['name']}: not every site replied validly: {rnd['sites']}")
        rounds.append({
            "name": rnd["name"], "seconds": rnd["seconds"],
            "bytes_to_site": sorted({v.get("bytes_sent", 0) for v in sites}),
            "bytes_from_site": sorted({v.get("bytes_received", 0) for v in sites}),
            "server_app": monitor.peak("server app", start, end), "superlink": monitor.peak("superlink", start, end),
            "clientapp": monitor.peak("clientapp", start, end), "supernode": monitor.peak("supernode", start, end),
            "superlink_database_mib": monitor.database_peak(start, end), "all_sites_gib": monitor.sites_peak(start, end),
            "machine_in_use_gib": monitor.machine_peak(start, end)})
    statistics = rounds[0]
    if statistics["bytes_from_site"] != [expected_bytes]:
        raise RuntimeError(f"statistics replies carried {statistics['bytes_from_site']} bytes, expected {expected_bytes}")
    return {"sites": len(result.report["federation"]["rounds"][0]["sites"]), "wall_seconds": round(result.wall_seconds, 1),
            "rounds": rounds, "timeline": monitor.timeline(result.started, result.started + result.wall_seconds)}


def print_tables(results: dict) -> None:
    print(f"command: {results['command']}")
    m = results["machine"]
    print(f"machine: {m['cpus']} CPUs, {m['memory_gib']} GiB, torch {m['torch']}, flwr {m['flwr']}; load average "
          f"{m['load_before']} before, {m['load_after']} after; {m['in_use_before_gib']} GiB in use before the run")
    print(f"model: {results['model']['name']} {results['model']['kwargs']} ({results['parameters'] / 1e6:.1f}M params); "
          f"plan {results['plan']}")
    print(f"statistics reply per site: {results['payload_bytes']:,} bytes ({results['payload_bytes'] / 1e6:.1f} MB)\n")
    print("| sites | round | wall time (s) | bytes to each site | bytes from each site | server app peak RSS (MiB) "
          "| SuperLink peak RSS / SQLite file (MiB) | one site: ClientApp / SuperNode peak RSS (MiB) "
          "| all sites' processes (GiB) "
          "| machine in use (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in results["runs"]:
        for r in run["rounds"]:
            print(f"| {run['sites']} | {r['name']} | {r['seconds']:.1f} | {r['bytes_to_site'][0]:,} | "
                  f"{r['bytes_from_site'][0]:,} | {r['server_app']['peak_rss_mib']} | {r['superlink']['peak_rss_mib']} / "
                  f"{r['superlink_database_mib']} | "
                  f"{r['clientapp']['peak_rss_mib']} / {r['supernode']['peak_rss_mib']} | {r['all_sites_gib']} "
                  f"| {r['machine_in_use_gib']} |")
    print()
    for run in results["runs"]:
        print(f"{run['sites']} sites: flwr run {run['wall_seconds']} s in all; maps vs centralised solve on the union: "
              f"max relative error {run['max_relative_error']:.2e} (tolerance {TOLERANCE:g})")
    for line in results["ratios"].values():
        print(line)
    print(f"Flower processes sampled: {results['processes']['sampled']}; still running after the benchmark stopped "
          f"them: {results['processes']['left_running'] or 'none'}")


def ratios(runs: list[dict]) -> dict[str, str]:
    full = runs[-1]
    stats = full["rounds"][0]
    out = {"overhead": f"statistics round, {full['sites']} sites: federated {stats['seconds']:.1f} s vs in-process "
                       f"{full['local_statistics_seconds']:.1f} s: {stats['seconds'] / full['local_statistics_seconds']:.2f}x"}
    if len(runs) == 2:
        base = runs[0]
        for i, name in enumerate(r["name"] for r in full["rounds"]):
            t_full, t_base = full["rounds"][i]["seconds"], base["rounds"][i]["seconds"]
            out[f"scaling-{name}"] = (
                f"{name} round, {full['sites']} vs {base['sites']} sites: {t_full:.1f} s vs {t_base:.1f} s: "
                f"{t_full / t_base:.2f}x for {full['sites'] / base['sites']:.0f}x the sites "
                f"(per site {t_full / full['sites'] / (t_base / base['sites']):.2f}x)")
        peak_full, peak_base = (r["rounds"][0]["server_app"]["peak_rss_mib"] for r in (full, base))
        if peak_full and peak_base:
            out["server-memory"] = (
                f"server app peak RSS in the statistics round, {full['sites']} vs {base['sites']} sites: {peak_full:.0f} "
                f"vs {peak_base:.0f} MiB: {(peak_full - peak_base) / (full['sites'] - base['sites']):.0f} MiB more per "
                f"site, {(peak_full - peak_base) * MIB / (full['sites'] - base['sites']) / full['payload_bytes']:.2f}x "
                f"the reply")
    return out


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _interrupted(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds the ExitStack: every process started is stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--baseline-sites", type=int, default=2, help="smaller federation run first (0: none)")
    parser.add_argument("--dim", type=int, default=768, help="embed_dim of the random ViT")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--min-payload-mb", type=float, default=100.0, help="each site's statistics reply, MB (1e6 B)")
    parser.add_argument("--images", type=int, default=IMAGES, help="synthetic images per site (20%% held out)")
    parser.add_argument("--concurrent-sites", type=int, default=2, help="sites computing at once (site_executors.py)")
    parser.add_argument("--round-timeout", type=float, default=3600.0)
    parser.add_argument("--memory-floor-gib", type=float, default=2.0,
                        help="kill the Flower apps if the machine's available memory falls below this")
    parser.add_argument("--sample-interval", type=float, default=0.5)
    parser.add_argument("--out", type=Path, help="write the results as JSON here (after each run)")
    parser.add_argument("--quick", action="store_true", help="2 sites, d=64, 0.5 MB replies, no baseline (~1 min)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sites, args.baseline_sites, args.dim, args.min_payload_mb, args.images = 2, 0, 64, 0.5, QUICK_IMAGES
    if not 0 <= args.baseline_sites < args.sites:
        parser.error("--baseline-sites must be between 0 and --sites - 1")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupted)
    plan, depth, payload = plan_for_payload(args.dim, int(args.min_payload_mb * 1e6))
    spec = model_spec(args.dim, depth, args.heads)
    model = create_model(ModelConfig.model_validate(spec))
    names = [f"site-{i:02d}" for i in range(1, args.sites + 1)]
    groups = [names[:args.baseline_sites], names[args.baseline_sites:]] if args.baseline_sites else [names]
    monitor = ProcessMonitor(args.sample_interval, int(args.memory_floor_gib * MIB))
    results = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
               "machine": {"cpus": os.cpu_count(), "memory_gib": round(monitor.total_kib / MIB, 1),
                           "platform": platform.platform(), "torch": torch.__version__, "flwr": flwr.__version__,
                           "torch_threads": torch.get_num_threads(), "load_before": os.getloadavg()[0],
                           "in_use_before_gib": round((monitor.total_kib - available_kib()) / MIB, 2)},
               "model": spec, "parameters": sum(p.numel() for p in model.parameters()), "plan": plan,
               "payload_bytes": payload, "concurrent_sites": args.concurrent_sites, "runs": []}
    progress(f"plan {plan} on a {depth}-block ViT at d={args.dim}: {payload:,} bytes per statistics reply")
    parsed = parse_plan(plan, depth)
    monitor.start()
    try:
        with tempfile.TemporaryDirectory(prefix="tba-fed-scale-") as tmp, contextlib.ExitStack() as stack:
            deployment = Deployment(Path(tmp), stack, monitor, args.images, args.concurrent_sites)
            deployment.start(names)
            for group in groups:
                deployment.add_sites(group)
                progress(f"{len(deployment.sites)} SuperNodes up; flwr run")
                result = deployment.run(f"{len(deployment.sites)}-sites", spec, plan, args.round_timeout)
                run = summarise(result, monitor, payload)
                progress(f"{run['sites']} sites: rounds {[(r['name'], r['seconds']) for r in run['rounds']]}; "
                         "now the same statistics in this process, and the centralised solve")
                sites = list(deployment.sites.values())
                run["payload_bytes"] = payload
                run["local_statistics_seconds"] = round(local_statistics(model, sites, parsed), 1)
                run["max_relative_error"] = max_relative_error(result.output, model, sites, parsed)
                progress(f"{run['sites']} sites: in-process {run['local_statistics_seconds']} s; maps vs centralised "
                         f"{run['max_relative_error']:.2e}")
                results["runs"].append(run)
                if args.out:
                    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    finally:
        monitor.stop()
    results["clientapp_turns"] = deployment.executors.served  # counted as the SuperExecs were stopped
    results["processes"] = {"sampled": len(monitor.seen), "left_running": monitor.survivors()}
    results["machine"]["load_after"] = os.getloadavg()[0]
    results["ratios"] = ratios(results["runs"])
    results["passed"] = all(r["max_relative_error"] < TOLERANCE for r in results["runs"]) and \
        not results["processes"]["left_running"]
    print_tables(results)
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
