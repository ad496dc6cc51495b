"""Canary audit of a site's releases at full size: empirical lower bounds on ε next to the claimed ε.

The same audit as tests/test_canary_audit.py (its harness: tests/neighbours.py), with many more
releases, for each release kind and for the statistics in both aggregation modes, at two budgets. A
tiny random timm ViT at a site holding 30 ordinary images; D' adds a canary (a high-contrast
checkerboard, far outside the clipping bounds) that the site's per-image decision puts in its
calibration part. The exact sums of D and D' come from the site's real ClientApp (the seeded noise of
both releases cancels); each is then released `--trials` times by the site's own noise step with fresh
CSPRNG noise (in secure mode: three sites' shares of σ/√3 each, summed, as SecAgg+ sums them), and
the optimal test guesses which dataset each release came from (`tests/empirical.py`).

Columns: the claimed ε of that one release (its run declares the four releases at the run's ε), the
lower bounds at 95% confidence from Clopper-Pearson (any mechanism) and from the measured separation
under Gaussian DP, the separation μ̂ with its 95% interval, what the exact sums give (μ) and the ceiling
1/σ no neighbouring pair may exceed. A bound above the claimed ε, or μ̂'s interval above 1/σ, is a bug.

    python benchmarks/canary_audit.py --trials 20000 --out outputs/canary-audit.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the audit's harness lives beside the tests that use it

import neighbours as nb  # noqa: E402
from clientapp_grid import ClientAppGrid  # noqa: E402

from clients.client_app import app  # noqa: E402
from tba_fed import ModelConfig, create_model  # noqa: E402
from tba_fed.fileio import atomic_write_text  # noqa: E402
from tba_fed.privacy.accounting import epsilon_spent, noise_multiplier  # noqa: E402
from empirical import audit_release  # noqa: E402
from tba_fed.selection import decide, development_key  # noqa: E402

TINY = {"img_size": 32, "patch_size": 8, "depth": 6, "embed_dim": 48, "num_heads": 3, "num_classes": 5}
MODEL = {"name": "vit_tiny_patch16_224", "kwargs": TINY}
COUNT = 30
SITES = 3

_logger = logging.getLogger("canary_audit")


def releases(root: Path, images: nb.Images, bounds: nb.Bounds, names: list[str]) -> dict[str, dict]:
    """Every plain release of a site holding `images` (an image folder), through its real ClientApp."""
    data = nb.write_source("image_folder", root / "data", images, names)
    site = nb.site_yaml(root / "site.yaml", data, ledger=root / "ledger.json")
    grid = ClientAppGrid(app, node_configs=[{"site-config": str(site)}])
    return {kind: nb.released(kind, grid.answer([msg])[0], 48) for kind, msg in nb.messages(MODEL, bounds, 48).items()}


def secure(release, others: list[dict[str, np.ndarray]]):
    """The secure-aggregation release as the server sees it: every site adds its share of the noise (the
    release run with σ/√sites) to its own sums, and SecAgg+ sums the shares; `others` are the other sites'
    exact sums, so a centre is the sum over all sites."""
    def summed(centre):
        own = {k: v - sum(o[k] for o in others) for k, v in centre.items()}
        shares = [release(own), *(release(o) for o in others)]
        return {k: sum(s[k] for s in shares) for k in shares[0]}
    return summed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20000, help="releases on each of D and D'")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0], help="the run's ε (four releases)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "canary-audit.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr, force=True)
    logging.getLogger("tba_fed").setLevel(logging.WARNING)  # the sites' per-release lines
    from flwr.supercore.task_identity import TaskIdentity

    model = create_model(ModelConfig.model_validate(MODEL))
    bounds = nb.reference_bounds(model)
    base = nb.ordinary(COUNT)
    names = [f"m{k:05d}" for k in range(COUNT)]
    canary = next(c for c in (nb.canary(v) for v in range(64))
                  if decide(nb.record_of("image_folder", c[0]), development_key(0), sample_rate=1.0,
                            holdout_fraction=nb.HOLDOUT) == "calibration")
    neighbour = base.insert(COUNT // 2, *canary)
    rows = []
    with tempfile.TemporaryDirectory(prefix="canary-audit-") as tmp, \
            mock.patch.multiple(TaskIdentity, _run_id=1, _task_id=1, _node_id=0, create=True):
        root = Path(tmp)
        before = releases(root / "D", base, bounds, names)
        after = releases(root / "D2", neighbour, bounds, names[:COUNT // 2] + [f"m{COUNT // 2 - 1:05d}x"]
                         + names[COUNT // 2:])
        others = [releases(root / f"other-{k}", nb.ordinary(COUNT, seed=k + 1), bounds, names)["statistics"]
                  for k in range(SITES - 1)]
        for epsilon in args.epsilons:
            sigma = noise_multiplier(epsilon, 1e-5, 4)
            claimed = epsilon_spent([(sigma, 1)], 1e-5)
            for kind, mode in (("statistics", "local"), ("statistics", "secure"), ("similarity", "local"),
                               ("probe", "local")):
                start = time.perf_counter()
                if mode == "secure":
                    share, stds = nb.mechanism(kind, bounds, sigma / np.sqrt(SITES), 48, tokens=17)
                    release = secure(share, [{k: np.asarray(v, dtype=np.float64) for k, v in o.items()} for o in others])
                    stds = {k: v * np.sqrt(SITES) for k, v in stds.items()}  # the sum carries σ
                    c0 = {k: sum(np.asarray(o[k], dtype=np.float64) for o in [before[kind], *others]) for k in stds}
                    c1 = {k: sum(np.asarray(o[k], dtype=np.float64) for o in [after[kind], *others]) for k in stds}
                    c0 = {**{k: v for k, v in before[kind].items() if k not in c0}, **c0}
                    c1 = {**{k: v for k, v in after[kind].items() if k not in c1}, **c1}
                else:
                    release, stds = nb.mechanism(kind, bounds, sigma, 48, tokens=17)
                    c0, c1 = before[kind], after[kind]
                result = audit_release(release, c0, c1, stds, trials=args.trials, delta=1e-5, claimed_epsilon=claimed,
                                       noise_multiplier=sigma)
                rows.append({"run_epsilon": epsilon, "release": kind, "mode": mode, "seconds": time.perf_counter() - start,
                             **asdict(result)})
                _logger.info("ε=%g %s (%s): claimed %.3f, ε ≥ %.3f (CP), ε ≥ %.3f (GDP), μ̂ %.3f [%.3f, %.3f], μ %.3f, "
                             "1/σ %.3f", epsilon, kind, mode, claimed, result.epsilon_cp, result.epsilon_gdp, result.mu,
                             result.mu_low, result.mu_high, result.mu_expected, result.mu_ceiling)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(rows, indent=1) + "\n")
    print("| run ε | release | claimed ε (one release) | ε ≥ (Clopper-Pearson) | ε ≥ (Gaussian DP) | μ̂ [95%] | μ | 1/σ |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run_epsilon']:g} | {r['release']} ({r['mode']}) | {r['claimed_epsilon']:.3f} | {r['epsilon_cp']:.3f} "
              f"| {r['epsilon_gdp']:.3f} | {r['mu']:.3f} [{r['mu_low']:.3f}, {r['mu_high']:.3f}] | {r['mu_expected']:.3f} "
              f"| {r['mu_ceiling']:.3f} |")
    worst = max(max(r["epsilon_cp"], r["epsilon_gdp"]) / r["claimed_epsilon"] for r in rows)
    print(f"\nhighest empirical lower bound / claimed ε: {worst:.3f} ({args.trials} releases on each side, "
          f"{sum(r['seconds'] for r in rows):.0f} s)")


if __name__ == "__main__":
    main()
