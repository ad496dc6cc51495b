"""What the server writes of a run beyond the compression report: privacy, evaluation and federation sections."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..audit import check_chain
from ..checkpoint import manifest, write_compressed
from ..errors import one_line
from ..plan import Span
from ..privacy.solve import compare_priors
from ..report import compression_markdown, write_similarity
from ..report_html import REPORT_HTML, run_page
from ..solver import LinearMap
from ..stats import SimilarityStats, SpanStats
from .releases import SolverInputs


def privacy_markdown(report: Mapping[str, Any]) -> str:
    lines = []
    if "privacy" in report:
        p = report["privacy"]
        lines += ["", "## Privacy", "",
                  f"- (ε, δ) = ({p['epsilon']:g}, {p['delta']:g}) per site over {len(p['releases'])} release(s) "
                  f"({', '.join(p['releases'])}), {p['accountant'].upper()} accounting: noise multiplier σ = "
                  f"{p['noise_multiplier']:.4g}",
                  f"- the unit protected is one image, under add/remove-one-image adjacency; under replace-one adjacency "
                  f"the same noise gives ε ≤ {p['epsilon_replace_one']:.3g}",
                  f"- {p['aggregation']}; {p['sites_summed']} sites summed; noise: {p['noise']}",
                  "- image counts above are released counts: noisy sums of the per-image weights that bound each "
                  "image's contribution (an image far outside the bounds counts less than one)",
                  "- the Gram matrices were projected onto the PSD cone; ridge λ from AdaSSP (noise bound minus a "
                  "private estimate of the smallest eigenvalue):", ""]
        lines += [f"  - {s}: λ = {v['ridge_lambda']:.4g} (noise bound {v['noise_bound']:.4g})" for s, v in p["spans"].items()]
        if "map_auto" in p:
            lines += ["", f"- {p['map_auto']} (each span's kind then chosen by its noisy held-out error: post-processing)"]
    if "prior_comparison" in report:
        noisy = (" (estimated from the noisy held-out sums; ± is the spread those estimates get from the release's "
                 "own noise, and the calibration columns above come from noisy sums too)") if "privacy" in report else ""
        names = list(next(iter(report["prior_comparison"].values())))
        lines += ["", "## What the sites' data bought", "",
                  f"Held-out error relative to dropping the blocks{noisy}; installed prior: {report['prior']}.", "",
                  "| span | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        spread = report.get("prior_comparison_std", {})
        for span, row in report["prior_comparison"].items():
            cells = ["n/a (noisy held-out error ≤ 0)" if row[n] is None else
                     f"{row[n]:.4f}" + (f" ± {spread[span][n]:.4f}" if n in spread.get(span, {}) else "") for n in names]
            lines.append(f"| {span} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if lines else ""


def evaluation_markdown(evaluation: dict[str, Any]) -> str:
    lines = ["", "## Accuracy", "", f"{evaluation['probe']} (ridge {evaluation['probe_ridge']}), fitted on "
             f"{evaluation['probe_images']} calibration images of all sites, tested on their held-out images.", "",
             "| site | held-out images | original | compressed |", "|---|---|---|---|"]
    for site, row in evaluation["sites"].items():
        lines.append(f"| {site} | {row['images']} | {row['original']:.4f} | {row['compressed']:.4f} |")
    lines.append(f"| **pooled** | {evaluation['test_images']} | {evaluation['pooled']['original']:.4f} "
                 f"| {evaluation['pooled']['compressed']:.4f} |")
    return "\n".join(lines) + "\n"


PROFILE_NOTES = {"production": "TLS, registered SuperNode keys, persistent SuperLink state",
                 "development": "simulation or local test: no TLS, authentication or persistence guarantees"}


def _cell(text: str) -> str:
    """A table cell from text a site chose (its name, its reason): one line, its pipes escaped."""
    return one_line(text).replace("|", "\\|")


def federation_markdown(fed: dict[str, Any], profile: str, superlink_checks: list[str] | None = None) -> str:
    lines = ["", "## Federation", "", f"- profile: **{profile}** ({PROFILE_NOTES[profile]})",
             *(f"  - verified before round 1: `{line}`" for line in superlink_checks or ()),
             f"- sites connected: {fed['sites_connected']}; maps sha256 `{fed['maps_sha256']}`",
             "", "| round | site | status | images | array bytes sent | array bytes received | reason |",
             "|---|---|---|---|---|---|---|"]
    for rnd in fed["rounds"]:
        for site, entry in sorted(rnd["sites"].items()):
            lines.append(f"| {rnd['name']} ({rnd['seconds']:.1f} s) | {_cell(site)} | {entry['status']} "
                         f"| {entry.get('images', '')} "
                         f"| {entry.get('bytes_sent', 0):,} | {entry.get('bytes_received', 0):,} "
                         f"| {_cell(entry.get('reason', ''))} |")
    return "\n".join(lines) + "\n"


def prior_comparison(inputs: SolverInputs, draws: Mapping[str, Mapping[Span, Sequence[SpanStats]]],
                     kinds: Mapping[Span, str], public_maps: Mapping[Span, LinearMap], identity: Iterable[Span], *,
                     bias: bool, ridge: float, private: bool) -> dict[str, Any]:
    """What the sites' data bought: each span's held-out error under each prior, relative to dropping the blocks
    (and, for a private release, the spread the release's own noise gives each estimate), on the statistics of the
    kind each span installs (`kinds`: under ``map: auto``, the kind chosen)."""
    lambdas = inputs.ridge_lambdas or {}
    comparison = {s: compare_priors(inputs.calibration[kind][s], inputs.holdout[kind][s], bias=bias, ridge=ridge,
                                    shrink_bias=private,
                                    ridge_lambda=lambdas[kind][s] if kind in lambdas else None,
                                    public=public_maps.get(s), holdout_draws=draws[kind][s])
                  for s, kind in sorted(kinds.items()) if s not in set(identity)}
    out: dict[str, Any] = {"prior_comparison": {str(s): c[0] for s, c in comparison.items()}}
    if private:
        out["prior_comparison_std"] = {str(s): c[1] for s, c in comparison.items()}
    return out


def write_run(output: Path, overwrite: bool, maps: Mapping[Span, LinearMap], report: dict[str, Any], profile: str,
              superlink_checks: list[str] | None, similarity: SimilarityStats | None, audit_log: Path | None = None) -> str:
    """The compressed model, report.json, report.md and report.html (with the similarity plot of a budget run, and
    the server's audit log as verified now); returns the report's JSON."""
    report_json = json.dumps(report, indent=2) + "\n"
    markdown = compression_markdown(report) + privacy_markdown(report) \
        + (evaluation_markdown(report["evaluation"]) if "evaluation" in report else "") \
        + federation_markdown(report["federation"], profile, superlink_checks)
    audit = check_chain(audit_log).summary() if audit_log is not None and audit_log.is_file() else None
    html = run_page(report, similarity, audit, superlink_checks or ())
    write_compressed(output, maps, manifest(report, maps), overwrite=overwrite,
                     files={"report.json": report_json, "report.md": markdown, REPORT_HTML: html},
                     extra=None if similarity is None else (lambda folder: write_similarity(folder, similarity,
                                                                                          spans=sorted(maps))))
    return report_json
