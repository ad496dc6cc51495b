"""`tba-fed compress` end to end vs the seed's own estimator, each a whole process, interleaved per repeat.

    python benchmarks/compress_vs_seed.py                 # real DINOv2-S at 112 px, 2,000 Fashion-MNIST, span 2->4
    python benchmarks/compress_vs_seed.py --repeats 3 --seed-forward to-end-block

tba-fed: ``python -m tba_fed.cli compress`` (the ``tba-fed`` command) with ``--no-bias --holdout-fraction 0``, so
that it fits the same estimator on the same images as the seed: float64 sums streamed batch by batch, the
forward stopped after block e, maps and report written.

The seed (TBA, arXiv 2410.04941), as its public code (icannistraci/toast) does it: images preprocessed one at a
time in the loader's collate function, the encoder's forward with a hook per block storing each batch's outputs
(``.cpu().clone()``), ``torch.cat`` over the batches, rows flattened (all tokens), then one float32
``torch.linalg.lstsq(X_s, X_e).solution``. Two concessions to the seed: hooks only on blocks s and e (its code keeps
every block's outputs, 6x the memory here), and the same model loader and per-image preprocessing as tba-fed
(resize to the model's input size, no crop), so both fit the same inputs. ``--seed-forward to-end-block`` also stops
its forward after block e (its code runs every block).

Each side runs in a fresh process started with ``subprocess``; wall time is measured around it and peak RSS is the
child's own ``ru_maxrss`` from ``os.wait4``. The maps are compared as T (``X_s T ≈ X_e``): max |ΔT| and the relative
Frobenius difference, against the bound ``--map-tolerance`` on the relative difference (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def seed_child(args: argparse.Namespace) -> None:
    """The seed's method in this process: stack the outputs of blocks s and e, one float32 lstsq; save T."""
    import torch
    from torch.utils.data import DataLoader

    from tba_fed.config import DataConfig
    from tba_fed.data import data_config, fashion_mnist, pool_indices
    from tba_fed.dinov2_imgfocus import load_dinov2_imgfocus

    torch.set_num_threads(args.threads)
    start, end = (int(b) for b in args.span.split("->"))
    model = load_dinov2_imgfocus(img_size=args.img_size).eval()
    config = DataConfig(source="fashion_mnist", num_images=args.images, holdout_fraction=0.0)
    dataset = fashion_mnist(config, data_config(model))
    indices = pool_indices(dataset, config).tolist()
    loader = DataLoader(indices, batch_size=args.batch_size, shuffle=False,  # per-image preprocessing in the collate
                        collate_fn=lambda batch: torch.stack([dataset[i][0] for i in batch]))
    stored: dict[int, list[torch.Tensor]] = {start: [], end: []}
    hooks = [model.blocks[b].register_forward_hook(lambda _m, _i, out, b=b: stored[b].append(out.cpu().detach().clone()))
             for b in stored]
    with torch.no_grad():
        for images in loader:
            if args.seed_forward == "full":
                model.forward_features(images)
            else:
                x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
                model.blocks[: end + 1](x)
    for hook in hooks:
        hook.remove()
    x = torch.cat(stored.pop(start)).to(torch.float32)
    y = torch.cat(stored.pop(end)).to(torch.float32)
    solution = torch.linalg.lstsq(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])).solution
    np.save(args.seed_child, solution.numpy())


def run(command: list[str], log: Path) -> tuple[float, float]:
    """Wall seconds and the child's peak RSS (MiB) of one whole process."""
    started = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{command[:4]} failed ({child.returncode}); see {log}")
    return wall, usage.ru_maxrss / 1024


def tba_map(folder: Path, span: str) -> np.ndarray:
    from safetensors.numpy import load_file

    weight = load_file(str(folder / "maps.safetensors"))[f"span.{span.replace('->', '-')}.weight"]
    return weight.T  # LinearMap: y = x @ weight.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--span", default="2->4")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the seed's process "
                                                                               "(tba-fed uses torch's default)")
    parser.add_argument("--seed-forward", choices=["full", "to-end-block"], default="full",
                        help="the seed's forward: every block, as its code does (default), or stopped after block e")
    parser.add_argument("--map-tolerance", type=float, default=1e-3,
                        help="bound on ‖T_tba − T_seed‖_F / ‖T_seed‖_F (float32 precision of the seed's lstsq)")
    parser.add_argument("--seed-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seed_child:
        seed_child(args)
        return
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    rows, diffs = [], []
    with tempfile.TemporaryDirectory(prefix="compress-vs-seed-") as tmp:
        work = Path(tmp)
        for repeat in range(args.repeats):
            seed_out, tba_out = work / f"seed-{repeat}.npy", work / f"tba-{repeat}"
            seed_cmd = [sys.executable, __file__, "--seed-child", str(seed_out), "--images", str(args.images),
                        "--img-size", str(args.img_size), "--span", args.span, "--batch-size", str(args.batch_size),
                        "--threads", str(args.threads), "--seed-forward", args.seed_forward]
            tba_cmd = [sys.executable, "-m", "tba_fed.cli", "compress", "--model", "dinov2-s-imgfocus", "--model-arg",
                       f"img_size={args.img_size}", "--data", "fashion_mnist", "--num-images", str(args.images),
                       "--plan", args.span, "--no-bias", "--holdout-fraction", "0", "--batch-size", str(args.batch_size),
                       "-o", str(tba_out)]
            sides = [("seed", seed_cmd), ("tba-fed", tba_cmd)]
            for name, command in sides if repeat % 2 == 0 else sides[::-1]:  # alternate who goes first
                load = os.getloadavg()[0]
                wall, rss = run(command, work / f"{name}-{repeat}.log")
                rows.append({"repeat": repeat, "side": name, "wall": wall, "rss": rss, "load": load})
                print(f"repeat {repeat} {name}: {wall:.1f} s, peak RSS {rss:.0f} MiB (1-min load before: {load:.2f})",
                      flush=True)
            seed_map, tba = np.load(seed_out).astype(np.float64), tba_map(tba_out, args.span)
            diffs.append((float(np.abs(tba - seed_map).max()),
                          float(np.linalg.norm(tba - seed_map) / np.linalg.norm(seed_map)), float(np.abs(seed_map).max())))
    print("\n| repeat | side | wall (s) | peak RSS (MiB) | 1-min load before |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['repeat']} | {row['side']} | {row['wall']:.1f} | {row['rss']:.0f} | {row['load']:.2f} |")
    per_repeat = {(r["repeat"], r["side"]): r for r in rows}
    wall_ratios = [per_repeat[(i, "tba-fed")]["wall"] / per_repeat[(i, "seed")]["wall"] for i in range(args.repeats)]
    rss_ratios = [per_repeat[(i, "tba-fed")]["rss"] / per_repeat[(i, "seed")]["rss"] for i in range(args.repeats)]
    print(f"\nwall ratio tba-fed/seed per repeat: {', '.join(f'{r:.3f}' for r in wall_ratios)}; "
          f"median {statistics.median(wall_ratios):.3f} (target ≤ 0.8)")
    print(f"peak RSS ratio tba-fed/seed per repeat: {', '.join(f'{r:.3f}' for r in rss_ratios)}; "
          f"median {statistics.median(rss_ratios):.3f} (target ≤ 0.5)")
    worst = max(diffs, key=lambda d: d[1])
    print(f"maps: max |T_tba − T_seed| = {max(d[0] for d in diffs):.3e} (max |T_seed| {worst[2]:.3g}); relative "
          f"Frobenius difference {worst[1]:.3e} (bound {args.map_tolerance:g}): "
          f"{'agree' if worst[1] <= args.map_tolerance else 'DISAGREE'}")


if __name__ == "__main__":
    main()
