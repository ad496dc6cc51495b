"""Human- and machine-readable reports: similarity tables and heatmaps, compression summaries."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .pipeline import Compression
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


def similarity_heatmap(stats: SimilarityStats, path: Path, metric: str = "mse") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = stats.metric(metric)
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(np.log10(np.clip(values, 1e-6, None)) if metric == "mse" else values, cmap="viridis_r")
    ax.set_xlabel("target block e")
    ax.set_ylabel("source block s")
    ax.set_title(f"{'log10 ' if metric == 'mse' else ''}{metric} of span s->e")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_similarity(folder: Path, stats: SimilarityStats, metric: str = "mse") -> None:
    """similarity.json (all metrics), similarity.md (table) and similarity.png (heatmap) in `folder`."""
    metrics = {name: np.where(np.isnan(m := stats.metric(name)), None, m).tolist() for name in SIMILARITY_METRICS}
    (folder / "similarity.json").write_text(json.dumps({"images": stats.images, "tokens": stats.tokens, "metrics": metrics},
                                                       indent=2) + "\n")
    (folder / "similarity.md").write_text(similarity_markdown(stats, metric))
    similarity_heatmap(stats, folder / "similarity.png", metric)


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
        "spans": [fit.summary() for fit in result.fits.values()],
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def compression_markdown(report: dict) -> str:
    params = report["parameters"]
    lines = [
        f"# TBA compression: {report['model']['name'] if report['model'] else 'model'}", "",
        f"- plan: `{report['plan']}`; map `{report.get('map', 'linear')}`; token mode `{report['token_mode']}`; "
        f"bias {report['bias']}; ridge {report['ridge']}",
        f"- calibration images: {report['calibration_images']}; held-out images: {report['holdout_images']}",
        f"- parameters: {params['original']:,} -> {params['compressed']:,} "
        f"(removed {params['removed']:,}; paper's Table-1 convention: {params['paper_removed']:,})", "",
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
