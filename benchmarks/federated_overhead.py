"""What federating costs: bytes per site vs one FedAvg round, and wall time vs the centralised run.

    python benchmarks/federated_overhead.py                      # the demo's 3 sites, real DINOv2-S
    python benchmarks/federated_overhead.py --config configs/federated-smoke.yaml

One run measures, on the same images: (a) ``tba-fed simulate`` (Flower simulation engine) and (b) the
centralised engine (similarity, plan, statistics, solve, save) on the union of the sites' calibration
images. The simulation's fixed cost (SuperLink and Ray start-up, app install, model loading, shutdown)
is the wall time outside its rounds and is shown apart. Bytes: every array each site received and
sent, against FedAvg's per-round cost of sending the full model down and its update back (float32).
"""

from __future__ import annotations

import argparse
import importlib.resources
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from torch.utils.data import Subset

from tba_fed import analyze, calibrate, choose_plan, create_model, save_compressed, simulate
from tba_fed.config import load_yaml, read_yaml
from tba_fed.data import build_dataset, make_loader
from tba_fed.federation.config import load_federated_config
from tba_fed.federation.site import simulated_indices


def centralised(config_path: Path, output: Path) -> float:
    config = load_federated_config(config_path)
    start = time.perf_counter()
    model = create_model(config.model)
    dataset = build_dataset(config.data, model)
    p, n = config.federation.partition, config.federation.num_sites
    splits = [simulated_indices(config.data, dataset, np.asarray(dataset.targets), n, site, p.scheme, alpha=p.alpha,
                                shards_per_site=p.shards_per_site, seed=p.seed) for site in range(n)]
    calibration = make_loader(Subset(dataset, np.concatenate([c for c, _ in splits]).tolist()), config.data)
    holdout = make_loader(Subset(dataset, np.concatenate([h for _, h in splits]).tolist()), config.data)
    similarity = analyze(model, calibration, token_mode=config.token_mode)
    plan = choose_plan(model, similarity, blocks=config.budget.blocks, metric=config.budget.metric, bias=config.bias)
    result = calibrate(model, plan, calibration, holdout, token_mode=config.token_mode, bias=config.bias,
                       ridge=config.ridge, source=config.model)
    save_compressed(result, output, overwrite=True, similarity=similarity)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="federated YAML (default: the demo's, evaluation off)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        raw = read_yaml(args.config) if args.config else \
            load_yaml(importlib.resources.files("tba_fed").joinpath("configs/demo-federated.yaml").read_text())
        raw.update(output=str(tmp_path / "federated"), overwrite=True, evaluation={"enabled": False})
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(raw))
        start = time.perf_counter()
        report, _ = simulate(path)
        federated = time.perf_counter() - start
        central = centralised(path, tmp_path / "central")
    rounds = report["federation"]["rounds"]
    in_rounds = sum(r["seconds"] for r in rounds)
    sites = sorted({s for r in rounds for s in r["sites"]})
    per_site = {s: sum(r["sites"][s].get("bytes_sent", 0) + r["sites"][s].get("bytes_received", 0)
                       for r in rounds if s in r["sites"]) for s in sites}
    fedavg_round = 2 * report["parameters"]["original"] * 4
    print(f"command: python benchmarks/federated_overhead.py{' --config ' + str(args.config) if args.config else ''}\n")
    print("| run | wall time (s) |\n|---|---|")
    print(f"| tba-fed simulate, {len(sites)} sites (total) | {federated:.1f} |")
    print(f"| of which the rounds ({', '.join(r['name'] for r in rounds)}) | {in_rounds:.1f} |")
    print(f"| of which fixed start-up/shutdown (SuperLink, Ray, app, model load) | {federated - in_rounds:.1f} |")
    print(f"| centralised engine on the same images | {central:.1f} |")
    print(f"\nsimulate / centralised: {federated / central:.2f}x in total, {in_rounds / central:.2f}x counting rounds only\n")
    print("| site | bytes sent + received (all rounds) | FedAvg, one round (model down + up, float32) | ratio |")
    print("|---|---|---|---|")
    for site, total in per_site.items():
        print(f"| {site} | {total:,} | {fedavg_round:,} | {total / fedavg_round:.4f} |")


if __name__ == "__main__":
    main()
