"""Human- and machine-readable reports: similarity tables and heatmaps, compression summaries."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .pipeline import Compression
from .plan import Span
from .stats import SIMILARITY_METRICS, SimilarityStats


def similarity_markdown(stats: SimilarityStats, metric: str = "mse") -> str:
    """Upper-triangular table: row s, column e holds the cost of the span s->e."""
    values = stats.metric(metric)
    n = values.shape[0]
    lines = [f"Similarity ({metric}) of block outputs over {stats.images} images; row s, column e = span s->e.", "",
             "| s \\ e | " + " | ".join(str(e) for e in range(n)) + " |", "|---" * (n + 1) + "|"]
    for s in range(n):
        cells = ["" if np.isnan(values[s, e]) else f"{values[s, e]:.4g}" for e in range(n)]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (closed), for callers that write files atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    _pyplot().close(fig)
    return buffer.getvalue()


def span_cells(spans: Iterable[Span]) -> list[tuple[float, float, float, float]]:
    """(x, y, width, height) in the heatmap's data coordinates of each span's cell: column e, row s (imshow centres
    cell (s, e) on x = e, y = s)."""
    return [(span.end - 0.5, span.start - 0.5, 1.0, 1.0) for span in spans]


def similarity_figure(stats: SimilarityStats, metric: str = "mse", spans: Iterable[Span] = ()):
    """The heatmap of span costs, each of `spans` (the chosen plan) outlined in red."""
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    values = stats.metric(metric)
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(np.log10(np.clip(values, 1e-6, None)) if metric == "mse" else values, cmap="viridis_r")
    spans = list(spans)
    for x, y, width, height in span_cells(spans):
        ax.add_patch(Rectangle((x, y), width, height, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xlabel("target block e")
    ax.set_ylabel("source block s")
    title = f"{'log10 ' if metric == 'mse' else ''}{metric} of span s->e"
    ax.set_title(title + (f"\nchosen plan (red): {', '.join(map(str, spans))}" if spans else ""))
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def write_similarity(folder: Path, stats: SimilarityStats, metric: str = "mse", spans: Iterable[Span] = ()) -> None:
    """similarity.json (all metrics), similarity.md (table) and similarity.png (heatmap, `spans` outlined) in
    `folder`, a directory being written atomically."""
    metrics = {name: np.where(np.isnan(m := stats.metric(name)), None, m).tolist() for name in SIMILARITY_METRICS}
    (folder / "similarity.json").write_text(json.dumps({"images": stats.images, "tokens": stats.tokens, "metrics": metrics},
                                                       indent=2) + "\n")
    (folder / "similarity.md").write_text(similarity_markdown(stats, metric))
    (folder / "similarity.png").write_bytes(png_bytes(similarity_figure(stats, metric, spans)))


def accuracy_figure(summary: list[dict]):
    """Accuracy (mean ± std over seeds) against the exact parameters removed, one line per dataset and map kind;
    the original sits at 0 removed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dataset in dict.fromkeys(row["dataset"] for row in summary):
        rows = [r for r in summary if r["dataset"] == dataset]
        original = [r for r in rows if r["kind"] == "original"]
        for kind, marker in (("linear", "o"), ("identity", "x"), ("folded", "s")):
            points = sorted(original + [r for r in rows if r["kind"] == kind], key=lambda r: r["params_removed"])
            if len(points) > len(original):
                ax.errorbar([r["params_removed"] / 1e6 for r in points], [r["accuracy_mean"] for r in points],
                            yerr=[r["accuracy_std"] for r in points], marker=marker, capsize=3,
                            label=f"{dataset}, {kind}")
    ax.set_xlabel("parameters removed (millions, exact)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs parameters removed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_png(summary: list[dict]) -> bytes:
    return png_bytes(accuracy_figure(summary))


def latency_figure(latency: dict):
    """Speed-up of the compressed model over the original against the blocks removed: measured (p50 ratio) and
    FLOP-theoretical; the original sits at 0 removed, 1x."""
    plt = _pyplot()
    rows = latency["rows"]
    blocks = [0] + [row["blocks_removed"] for row in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(blocks, [1.0] + [row["speedup"] for row in rows], marker="o", label="measured (p50)")
    ax.plot(blocks, [1.0] + [row["theoretical_speedup"] for row in rows], marker="x", linestyle="--",
            label="theoretical (FLOPs)")
    ax.set_xlabel("blocks removed")
    ax.set_ylabel("speed-up over the original (x)")
    settings = latency["settings"]
    ax.set_title(f"Speed-up vs blocks removed\n({latency['runtime']}, batch {settings['batch_sizes'][0]}, "
                 f"{rows[0]['map']} maps, {settings['repeats']} interleaved calls)")
    ax.set_xticks(blocks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def latency_png(latency: dict) -> bytes:
    return png_bytes(latency_figure(latency))


def compression_dict(result: Compression) -> dict:
    return {
        "model": None if result.source is None else result.source.model_dump(mode="json"),
        "plan": str(result.plan),
        "token_mode": result.token_mode,
        "map": result.map_kind,
        "bias": result.bias,
        "ridge": result.ridge,
        "calibration_images": result.calibration_images,
        "holdout_images": result.holdout_images,
        "parameters": asdict(result.parameters),
        "flops": asdict(result.flops),
        "latency": None,  # measured (`benchmark.eager_latency`) only when asked: `compress --benchmark`; never estimated
        "spans": [fit.summary() for fit in result.fits.values()],
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def relative_change(original: int, compressed: int) -> str:
    return f"{original:,} -> {compressed:,} ({(compressed - original) / original:+.1%})" if original else "n/a"


def latency_lines(latency: dict | None) -> list[str]:
    """One line per batch size of an `eager_latency` section, measured against FLOP-theoretical speed-up."""
    if latency is None:
        return ["- latency: not measured (`tba-fed compress --benchmark` or `tba-fed benchmark DIR` measures it)"]
    return [f"- latency ({latency['runtime']}, batch {row['batch_size']}): p50 {row['original']['p50_ms']:.2f} ms -> "
            f"{row['compressed']['p50_ms']:.2f} ms, {row['speedup']:.2f}x measured vs {row['theoretical_speedup']:.2f}x "
            f"theoretical ({row['speedup_vs_theoretical']:.2f})" for row in latency["batches"]]


def _cost_lines(report: dict) -> list[str]:
    """FLOPs, latency and accuracy lines of the summary (each only when the report has it)."""
    lines = []
    if flops := report.get("flops"):
        lines.append(f"- FLOPs per image: {relative_change(flops['original'], flops['compressed'])} ({flops['counted']})")
    if "latency" in report:
        lines += latency_lines(report["latency"])
    if accuracy := report.get("accuracy"):
        how = accuracy["method"] + (f", fitted on {accuracy['probe_images']['original']} calibration images (ridge "
                                    f"{accuracy['probe_ridge']:g})" if accuracy["classifier"] == "probe" else "")
        lines.append(f"- accuracy on {accuracy['evaluation_images']:,} evaluation images ({accuracy['data']['source']}, "
                     f"split {accuracy['data']['split']}): original {accuracy['original']:.4f} "
                     f"({accuracy['correct']['original']:,} correct), compressed {accuracy['compressed']:.4f} "
                     f"({accuracy['correct']['compressed']:,} correct); {how}")
    return lines


def compression_markdown(report: dict) -> str:
    params = report["parameters"]
    lines = [
        f"# TBA compression: {report['model']['name'] if report['model'] else 'model'}", "",
        f"- plan: `{report['plan']}`; map `{report.get('map', 'linear')}`; token mode `{report['token_mode']}`; "
        f"bias {report['bias']}; ridge {report['ridge']}",
        f"- calibration images: {report['calibration_images']}; held-out images: {report['holdout_images']}",
        f"- parameters: {params['original']:,} -> {params['compressed']:,} "
        f"(removed {params['removed']:,}; paper's Table-1 convention: {params['paper_removed']:,})",
        *_cost_lines(report), "",
        "| span | kind | removed params | cond(G) | calib. rel. err | R² | held-out rel. err | identity held-out rel. err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    removed = {row["span"]: row["removed"] for row in params["spans"]}
    lines += [f"| {span['span']} | {span['kind']} | {removed[span['span']]:,} | {_fmt(span['condition_number'])} "
              f"| {_fmt(span['calibration_relative_error'])} | {_fmt(span['calibration_r2'])} "
              f"| {_fmt(span['holdout_relative_error'])} | {_fmt(span['identity_holdout_relative_error'])} |"
              for span in report["spans"]]
    lines += ["", "Relative error = Σ‖x_e − T(x_s)‖² / Σ‖x_e‖² (a folded map: Σ‖r − T(m)‖² / Σ‖r‖², r = x_e − h_s); "
                  "the identity column is the error of simply dropping the blocks. A map is worth keeping only where "
                  "its held-out error is below the identity's."]
    auto = [span for span in report["spans"] if "auto" in span]
    if auto:
        lines += ["", "`map: auto`: each span's held-out error of its output, Σ‖x_e − x̂_e‖² / Σ‖x_e‖², per kind; the "
                      "lower one is kept.", "", "| span | linear | folded | chosen |", "|---|---|---|---|"]
        lines += [f"| {span['span']} | {_fmt(span['auto']['holdout_error']['linear'])} "
                  f"| {_fmt(span['auto']['holdout_error']['folded'])} | {span['auto']['chosen']} |" for span in auto]
    return "\n".join(lines) + "\n"
