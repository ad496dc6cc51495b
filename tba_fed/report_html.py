"""report.html: a run's or a site's report as one self-contained page (inline CSS, plots as base64 PNG).

Nothing is fetched when the page opens: a hospital's operator may read it on a machine without network, and a page
that loaded a script, font or image from elsewhere would also tell that server it was opened. Jinja2 renders it
with autoescaping on, since site names, reasons and paths are text a site (or anyone who wrote a YAML) chose.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from importlib.resources import files
from typing import Any

from .plan import Span, parse_plan
from .stats import SimilarityStats

REPORT_HTML = "report.html"
CURVE_RESOURCE = "privacy-utility-summary.json"  # the study of docs/privacy-utility.md (studies/privacy_utility.py)
CURVE_SETTING = "DINOv2-S (dinov2-s-imgfocus, 112 px) on Fashion-MNIST, 3 sites, δ = 1e-5, 3 seeds"


def _num(value: Any, spec: str = ".4g") -> str:
    """A number as the reports print it; None (not measured) as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, spec)


def _environment() -> Any:
    import jinja2  # on first render: loading a compressed model needs no templates

    from .report_templates import TEMPLATES

    env = jinja2.Environment(loader=jinja2.DictLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    return env


def render(template: str, **context: Any) -> str:
    return _environment().get_template(template).render(**context)


def figure_png(fig: Any) -> str:
    """A matplotlib figure as base64 PNG for a data: URL (the figure is closed)."""
    from .report import png_bytes

    return base64.b64encode(png_bytes(fig)).decode("ascii")


def _plan_spans(plan: str, num_blocks: int) -> list[Span]:
    return list(parse_plan(plan, num_blocks).spans) if plan else []


def contributions(federation: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per site over every round: images it summarised, array bytes both ways, its status and every reason given."""
    sites: dict[str, dict[str, Any]] = {}
    for rnd in federation["rounds"]:
        for name, entry in sorted(rnd["sites"].items()):
            row = sites.setdefault(name, {"site": name, "images": None, "bytes_sent": 0, "bytes_received": 0,
                                          "rounds_ok": 0, "rounds": 0, "status": "ok", "reasons": []})
            row["rounds"] += 1
            row["bytes_sent"] += entry.get("bytes_sent", 0)
            row["bytes_received"] += entry.get("bytes_received", 0)
            if entry.get("images") is not None and (row["images"] is None or rnd["name"].startswith("statistics")):
                row["images"] = entry["images"]
            if entry["status"] == "ok":
                row["rounds_ok"] += 1
            elif row["status"] == "ok":
                row["status"] = f"{entry['status']} ({rnd['name']})"
            if entry.get("reason"):
                row["reasons"].append(f"{rnd['name']}: {entry['reason']}")
    return list(sites.values())


def spans_view(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each span's fit beside the identity skip's, with the verdict the markdown report states in words."""
    removed = {row["span"]: row["removed"] for row in report["parameters"]["spans"]}
    rows = []
    for span in report["spans"]:
        fitted, identity = span["holdout_relative_error"], span["identity_holdout_relative_error"]
        ratio = fitted / identity if fitted is not None and identity else None
        verdict = ("identity (blocks dropped)" if span["kind"] == "identity" else "n/a (no held-out images)"
                   if ratio is None else "map better than dropping the blocks" if ratio < 1 else "map WORSE than dropping")
        rows.append({**span, "removed": removed[span["span"]], "ratio": ratio, "verdict": verdict})
    return rows


def load_curve() -> list[dict[str, Any]]:
    """The privacy-utility study's summary, shipped with the package."""
    return json.loads(files("tba_fed").joinpath("resources", CURVE_RESOURCE).read_text())


def curve_view(report: Mapping[str, Any], curve: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The run's point on the study's privacy-utility curve: the study's curve closest to the run (its aggregation,
    its prior, the study's image count nearest the run's, its span if the study has it), and per fitted span the
    run's held-out error relative to the identity skip at the run's ε; None for a run that is not private."""
    if "privacy" not in report:
        return None
    privacy = report["privacy"]
    mode = "secure" if str(privacy["aggregation"]).startswith("secure") else "local"
    variant = "private + public prior" if report.get("prior") == "public" else "private"
    studied = sorted({row["span"] for row in curve})
    images = min({row["images"] for row in curve}, key=lambda n: abs(n - report["calibration_images"]))
    points = [{"span": row["span"], "ratio": row["ratio"], "epsilon": privacy["epsilon"]}
              for row in spans_view(report) if row["ratio"] is not None and row["kind"] != "identity"]
    span = next((p["span"] for p in points if p["span"] in studied), studied[0])
    line = sorted((row for row in curve if row["span"] == span and row["mode"] == mode and row["images"] == images),
                  key=lambda row: row["epsilon"])
    finite = [row for row in line if math.isfinite(row["epsilon"])]
    exact = next((row["error"][variant][0] for row in line if not math.isfinite(row["epsilon"])), None)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    eps = [row["epsilon"] for row in finite]
    mean = [row["error"][variant][0] for row in finite]
    std = [row["error"][variant][1] for row in finite]
    ax.errorbar(eps, mean, yerr=std, marker="o", label=f"study: {variant}, span {span}")
    if exact is not None:
        ax.axhline(exact, color="gray", linestyle="--", label="study: not private (ε = ∞)")
    ax.axhline(1.0, color="black", linestyle=":", label="identity skip (drop the blocks)")
    for point in points:
        ax.plot([point["epsilon"]], [point["ratio"]], marker="*", markersize=16, linestyle="none",
                label=f"this run: span {point['span']}, ε = {point['epsilon']:g}")
    ax.set_xscale("log")
    ax.set_xlabel("ε per site (δ = 1e-5)")
    ax.set_ylabel("held-out error / identity skip's")
    ax.set_title(f"privacy-utility: {mode} aggregation, {images} images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return {"png": figure_png(fig), "mode": mode, "variant": variant, "span": span, "images": images,
            "points": points, "setting": CURVE_SETTING,
            "study": [{"epsilon": row["epsilon"], "mean": row["error"][variant][0], "std": row["error"][variant][1]}
                      for row in line]}


def run_page(report: Mapping[str, Any], similarity: SimilarityStats | None = None,
             audit: Mapping[str, Any] | None = None, superlink_checks: Sequence[str] = ()) -> str:
    """report.html of a compressed model: `compress` (the report alone) or a federated run (its privacy, accuracy,
    federation sections, the server's audit log as verified when the report was written)."""
    from .report import similarity_figure

    heatmap = None
    if similarity is not None:
        num_blocks = similarity.metric("mse").shape[0]
        heatmap = figure_png(similarity_figure(similarity, "mse", _plan_spans(report["plan"], num_blocks)))
    federation = report.get("federation")
    return render("run.html.j2", report=report, spans=spans_view(report), heatmap=heatmap,
                  contributions=contributions(federation) if federation else None,
                  curve=curve_view(report, load_curve()), audit=audit, superlink_checks=list(superlink_checks))
