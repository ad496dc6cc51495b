"""Utility of private federated calibration: DINOv2-S on Fashion-MNIST, 3 sites (docs/privacy-utility.md).

For each seed, each site's clipped span sums are computed once with the library's own pass
(`collect_span_stats` with clipping bounds from public photos); every (ε, images per site, mode)
point then releases them through the library's Gaussian mechanism (`noisy_spans`, seeded noise so
the study is reproducible), adds the three sites' releases as the server does, and solves with the
server's post-processing (`private_inputs`: PSD projection, AdaSSP ridge) toward the identity
and toward the public-photo prior. Maps are scored on exact sums of held-out test images, as the
held-out error relative to dropping the blocks; the compressed model's accuracy uses a ridge probe
fitted on separate labelled images (an evaluation protocol, not part of the private run).

Modes: ``local`` (each site adds noise with multiplier σ; the server sees each noisy sum) and
``secure`` (SecAgg+ sums, each site adds σ/√3 so the sum carries σ). ε = inf is the non-private run
(exact, unclipped sums). One release per run (the plan is given; no similarity or probe release).

    python studies/privacy_utility.py --out outputs/privacy-utility
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from tba_fed.adapter import ViTAdapter
from tba_fed.calibrate import collect_span_stats
from tba_fed.config import DataConfig, ModelConfig
from tba_fed.data import build_dataset, make_loader
from tba_fed.models import create_model
from tba_fed.plan import Span, parse_plan
from tba_fed.privacy.accounting import noise_multiplier
from tba_fed.privacy.mechanism import NoiseSource
from tba_fed.privacy.public_prior import public_prior_maps, public_span_bounds
from tba_fed.privacy.release import noisy_spans
from tba_fed.privacy.clipped import ClippedSpanSums, SpanBounds
from tba_fed.privacy.sensitivity import span_parts
from tba_fed.privacy.solve import private_inputs
from tba_fed.probe import ProbeStats, solve_probe
from tba_fed.public_images import public_loader
from tba_fed.solver import LinearMap, fit_quality, solve_span
from tba_fed.stats import SpanStats

_logger = logging.getLogger("privacy_utility")
VARIANTS = ("identity", "public prior", "private", "private + public prior")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--per-site", type=int, nargs="+", default=[333, 1667, 3333], help="calibration images per site")
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1, 2, 4, 8, math.inf])
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--spans", default="2->4, 1->5")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--test-images", type=int, default=1000, help="held-out images scoring the maps")
    p.add_argument("--probe-images", type=int, default=1000, help="labelled images fitting the accuracy probe")
    p.add_argument("--accuracy-images", type=int, default=500, help="test images for accuracy")
    p.add_argument("--accuracy-per-site", type=int, default=1667, help="images per site of the accuracy points")
    p.add_argument("--accuracy-epsilons", type=float, nargs="+", default=[1, 4, math.inf],
                   help="ε of the accuracy points (secure-aggregation mode)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("outputs/privacy-utility"))
    p.add_argument("--replot", action="store_true", help="only redo table.md and the PNG from OUT/summary.json")
    return p.parse_args()


def _chunks(indices: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    edges = [0, *sizes]
    return [indices[a:b] for a, b in zip(edges[:-1], edges[1:])]


def site_stats(adapter: ViTAdapter, dataset, indices: np.ndarray, sizes: list[int], spans: list[Span],
               bounds: dict[str, dict[Span, SpanBounds]], priors: dict[str, dict[Span, LinearMap]],
               batch_size: int) -> dict[int, dict[str, dict[Span, object]]]:
    """One site's sums for every prefix size, in one forward pass: exact sums (the non-private run) and the
    weighted residual-form sums a private release makes around each prior (`ClippedSpanSums`, the library's)."""
    out: dict[int, dict[str, dict[Span, object]]] = {}
    acc: dict[str, dict[Span, object]] = {"exact": {s: SpanStats.zeros(adapter.embed_dim) for s in spans},
                                          **{k: {s: ClippedSpanSums.zeros(adapter.embed_dim) for s in spans} for k in priors}}
    last = max(s.end for s in spans)
    for size, chunk in zip(sizes, _chunks(indices, sizes)):
        with torch.inference_mode():
            for images, _ in make_loader(Subset(dataset, chunk.tolist()), DataConfig(batch_size=batch_size)):
                outs = list(adapter.iter_block_outputs(images, last))
                for span in spans:
                    x, y = outs[span.start], outs[span.end]
                    acc["exact"][span].update(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), images.shape[0])
                    for kind in priors:
                        acc[kind][span].update(x, y, priors[kind][span], bounds[kind][span])
        out[size] = {kind: {s: a + type(a).zeros(adapter.embed_dim) for s, a in per.items()} for kind, per in acc.items()}
    return out


def solve_point(per_site: list[dict[str, dict[Span, object]]], span: Span, bounds: dict[str, dict[Span, SpanBounds]],
                priors: dict[str, dict[Span, LinearMap]], tokens: int, epsilon: float, delta: float, mode: str,
                seed: int) -> dict[str, LinearMap]:
    """The server's maps for one (ε, mode) point from the sites' sums: each variant is its own run."""
    if math.isinf(epsilon):
        merged = sum((s["exact"][span] for s in per_site[1:]), per_site[0]["exact"][span])
        return {variant: solve_span(merged, bias=True, ridge=1e-6, prior=priors[kind][span])[0]
                for variant, kind in (("private", "identity"), ("private + public prior", "public"))}
    sigma = noise_multiplier(epsilon, delta, 1)
    noise_sites = len(per_site) if mode == "secure" else 1
    maps = {}
    for variant, kind in (("private", "identity"), ("private + public prior", "public")):
        parts = span_parts([span], {span: bounds[kind][span]})
        released = []
        for k, sums in enumerate(per_site):
            noise = NoiseSource(seed * 1000 + k * 97 + int(epsilon * 10) + (7 if mode == "secure" else 0))
            released.append(noisy_spans({"linear": {"c": {span: sums[kind][span]}}}, parts, sigma / math.sqrt(noise_sites),
                                        noise)["linear"]["c"][span])
        gram_std = next(p for p in parts if p.name.endswith(":gram")).std(sigma) * math.sqrt(len(per_site) / noise_sites)
        cleaned, ridges = private_inputs({span: sum(released[1:], released[0])}, {span: priors[kind][span]},
                                         {span: gram_std}, tokens, bias=True)
        maps[variant] = solve_span(cleaned[span], bias=True, ridge_lambda=ridges[span].ridge_lambda,
                                   prior=priors[kind][span], shrink_bias=True)[0]
    return maps


def block_inputs(adapter: ViTAdapter, dataset, indices: np.ndarray, start: int, batch_size: int) -> torch.Tensor:
    loader = make_loader(Subset(dataset, indices.tolist()), DataConfig(batch_size=batch_size))
    outs = []
    with torch.inference_mode():
        for images, _ in loader:
            *_, x = adapter.iter_block_outputs(images, start)
            outs.append(x)
    return torch.cat(outs)


def accuracy(adapter: ViTAdapter, span: Span, linear_map: LinearMap | None, probe_x: torch.Tensor, probe_y: np.ndarray,
             test_x: torch.Tensor, test_y: np.ndarray) -> float:
    """Accuracy of the compressed model (None: the original) with a ridge probe on its features."""
    model = adapter.model

    def feats(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = []
            for chunk in x.split(128):
                if linear_map is None:
                    h = adapter.run_blocks(chunk, span.start + 1, adapter.num_blocks)
                else:
                    h = adapter.run_blocks(linear_map.apply(chunk.double()).float(), span.end + 1, adapter.num_blocks)
                out.append(model.forward_head(model.norm(h), pre_logits=True))
            return torch.cat(out)

    train = feats(probe_x)
    stats = ProbeStats.zeros(train.shape[1], 10)
    stats.update(train, torch.as_tensor(probe_y))
    head = solve_probe(stats, ridge=1e-6)
    return float((head.predict(feats(test_x)) == torch.as_tensor(test_y)).double().mean())


def run(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="dinov2-s-imgfocus", kwargs={"img_size": args.img_size}))
    adapter = ViTAdapter(model)
    spans = [parse_plan(part.strip(), adapter.num_blocks).spans[0] for part in args.spans.split(",")]
    tokens = adapter.tokens_per_image("all")
    public = public_loader(model, 336, batch_size=args.batch_size)
    identity = LinearMap(torch.eye(adapter.embed_dim, dtype=torch.float64), None)
    priors = {"identity": {s: identity for s in spans},
              "public": public_prior_maps(model, public, spans, "all", bias=True)["linear"]}
    held_out_crops = public_loader(model, 336, batch_size=args.batch_size, seed=1)
    bounds = {kind: public_span_bounds(model, held_out_crops, spans, {"linear": p}, "all", 1.0)["linear"]
              for kind, p in priors.items()}
    _logger.info("per-image bounds (public-photo medians): %s", bounds)
    train = build_dataset(DataConfig(source="fashion_mnist", split="train"), model)
    test = build_dataset(DataConfig(source="fashion_mnist", split="test"), model)
    train_y, test_y = np.asarray(train.targets), np.asarray(test.targets)
    sizes = sorted(args.per_site)
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(train))
        need = args.sites * sizes[-1]
        site_idx = [order[k * sizes[-1]:(k + 1) * sizes[-1]] for k in range(args.sites)]
        probe_idx = order[need:need + args.probe_images]
        test_order = rng.permutation(len(test))
        test_idx, acc_idx = test_order[:args.test_images], test_order[args.test_images:args.test_images + args.accuracy_images]
        cache = args.out / f"sums-v2-seed{seed}-{'-'.join(map(str, sizes))}.pt"
        if cache.is_file():  # the forward passes dominate: reuse them when only the release or solve changes
            sums, held = torch.load(cache, weights_only=False)
        else:
            sums = [site_stats(adapter, train, idx, sizes, spans, bounds, priors, args.batch_size) for idx in site_idx]
            held = {s: collect_span_stats(adapter, make_loader(Subset(test, test_idx.tolist()), DataConfig(batch_size=64)),
                                          [s])[s] for s in spans}
            torch.save((sums, held), cache)
        _logger.info("seed %d: sums of %d sites computed in %.0f s", seed, args.sites, time.perf_counter() - start)
        for span in spans:
            base = fit_quality(held[span], identity).sse
            cached = {"probe": block_inputs(adapter, train, probe_idx, span.start, args.batch_size),
                      "test": block_inputs(adapter, test, acc_idx, span.start, args.batch_size)}

            def acc(m: LinearMap | None, span=span, cached=cached, probe_idx=probe_idx, acc_idx=acc_idx) -> float:
                return accuracy(adapter, span, m, cached["probe"], train_y[probe_idx], cached["test"], test_y[acc_idx])

            fixed = {"identity": identity, "public prior": priors["public"][span]}
            fixed_err = {k: fit_quality(held[span], m).sse / base for k, m in fixed.items()}
            fixed_acc = {"original": acc(None), **{k: acc(m) for k, m in fixed.items()}}
            for mode in ("local", "secure"):
                for eps in args.epsilons:
                    for size in sizes:
                        maps = solve_point([s[size] for s in sums], span, bounds, priors, tokens, eps, args.delta, mode,
                                           seed)
                        row = {"seed": seed, "span": str(span), "mode": mode, "epsilon": eps, "per_site": size,
                               "images": size * args.sites,
                               "error": {**fixed_err, **{k: fit_quality(held[span], m).sse / base for k, m in maps.items()}}}
                        if size == args.accuracy_per_site and mode == "secure" and eps in args.accuracy_epsilons:
                            row["accuracy"] = {**fixed_acc, **{k: acc(m) for k, m in maps.items()}}
                        rows.append(row)
                        _logger.info("seed %d %s %s ε=%g n=%d: error %s, accuracy %s", seed, span, mode, eps,
                                     size * args.sites, {k: round(v, 3) for k, v in row["error"].items()},
                                     {k: round(v, 4) for k, v in row.get("accuracy", {}).items()})
        _logger.info("seed %d done in %.0f s", seed, time.perf_counter() - start)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["span"], r["mode"], r["epsilon"], r["images"]), []).append(r)
    out = []
    for (span, mode, eps, images), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3], kv[0][2])):
        entry = {"span": span, "mode": mode, "epsilon": eps, "images": images, "seeds": len(rs)}
        for key in ("error", "accuracy"):
            if all(key in r for r in rs):
                entry[key] = {v: (float(np.mean([r[key][v] for r in rs])), float(np.std([r[key][v] for r in rs])))
                              for v in rs[0][key]}
        out.append(entry)
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| span | mode | ε | images (3 sites) | identity | public prior | private | private + public prior |",
             "|---|---|---|---|---|---|---|---|"]
    for e in summary:
        cells = " | ".join(f"{e['error'][v][0]:.3f} ± {e['error'][v][1]:.3f}" for v in VARIANTS)
        lines.append(f"| {e['span']} | {e['mode']} | {e['epsilon']:g} | {e['images']} | {cells} |")
    lines += ["", "| span | ε | original | identity | public prior | private | private + public prior |",
              "|---|---|---|---|---|---|---|"]
    for e in summary:
        if "accuracy" in e:
            cells = " | ".join(f"{100 * e['accuracy'][v][0]:.2f} ± {100 * e['accuracy'][v][1]:.2f}"
                               for v in ("original", *VARIANTS))
            lines.append(f"| {e['span']} | {e['epsilon']:g} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, images: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans = sorted({e["span"] for e in summary})
    fig, axes = plt.subplots(2, len(spans), figsize=(5.5 * len(spans), 8), squeeze=False)
    for col, span in enumerate(spans):
        ax = axes[0][col]
        for mode, style in (("secure", "-"), ("local", "--")):
            pts = [e for e in summary if e["span"] == span and e["mode"] == mode and e["images"] == images]
            finite = [e for e in pts if math.isfinite(e["epsilon"])]
            for variant, color in (("private", "tab:blue"), ("private + public prior", "tab:green")):
                ax.errorbar([e["epsilon"] for e in finite], [e["error"][variant][0] for e in finite],
                            yerr=[e["error"][variant][1] for e in finite], color=color, linestyle=style, marker="o",
                            label=f"{variant} ({mode})")
        ref = [e for e in summary if e["span"] == span and e["images"] == images][0]["error"]
        ax.axhline(ref["identity"][0], color="gray", label="identity (drop blocks)")
        ax.axhline(ref["public prior"][0], color="tab:orange", label="public prior alone")
        inf = [e for e in summary if e["span"] == span and e["images"] == images and math.isinf(e["epsilon"])]
        if inf:
            ax.axhline(inf[0]["error"]["private"][0], color="black", linestyle=":", label="non-private")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.1)  # small private runs can be worse than dropping the blocks: the table has their values
        ax.set_xlabel("ε (δ = 1e-5)")
        ax.set_ylabel("held-out error / identity's")
        ax.set_title(f"span {span}, {images} images over 3 sites")
        ax.legend(fontsize=7)
        ax = axes[1][col]
        for eps, color in ((1.0, "tab:red"), (4.0, "tab:purple")):
            for variant, style in (("private", "--"), ("private + public prior", "-")):
                pts = sorted([e for e in summary if e["span"] == span and e["mode"] == "secure" and e["epsilon"] == eps],
                             key=lambda e: e["images"])
                ax.errorbar([e["images"] for e in pts], [e["error"][variant][0] for e in pts],
                            yerr=[e["error"][variant][1] for e in pts], color=color, linestyle=style, marker="o",
                            label=f"{variant}, ε={eps:g}")
        ax.axhline(ref["public prior"][0], color="tab:orange", label="public prior alone")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.1)
        ax.set_xlabel("calibration images (3 sites), secure aggregation")
        ax.set_ylabel("held-out error / identity's")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def replot(out: Path, images: int) -> None:
    """Table and plot again from a finished run's summary.json."""
    summary = json.loads((out / "summary.json").read_text())
    (out / "table.md").write_text(markdown(summary))
    plot(summary, out / "privacy-utility.png", images)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    args = _parse()
    if args.replot:
        replot(args.out, args.accuracy_per_site * args.sites)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = run(args)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    summary = summarise(rows)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "table.md").write_text(markdown(summary))
    plot(summary, args.out / "privacy-utility.png", args.accuracy_per_site * args.sites)
    print(markdown(summary))


if __name__ == "__main__":
    main()
