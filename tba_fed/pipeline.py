"""The centralised TBA run as plain functions: analyse, choose a plan, fit, build.

The federated server calls the same ``solve_plan`` on statistics merged from sites, so both paths
share every line that turns statistics into a model.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch
from torch import nn

from .adapter import ViTAdapter, collected_kinds
from .calibrate import collect_kind_stats, collect_similarity
from .compressed import FlopReport, ParameterReport, build_compressed, flop_report, parameter_report
from .config import ModelConfig
from .errors import TBAInputError
from .plan import Plan, Span, parse_plan, select_plan
from .solver import FitQuality, LinearMap, SolveDiagnostics, fit_quality, solve_span
from .stats import SimilarityStats, SpanStats

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KindChoice:
    """Why a span got its kind under ``map: auto``: each kind's held-out error of the span's output,
    Σ‖x_e − x̂_e‖² / Σ‖x_e‖² (the same denominator for both, so the two are comparable), and the smaller one."""

    holdout_errors: dict[str, float]
    chosen: str


@dataclass(frozen=True)
class SpanFit:
    """A span's map with its fit on the calibration sums and, if given, on the held-out sums."""

    span: Span
    map: LinearMap
    diagnostics: SolveDiagnostics | None
    calibration: FitQuality
    identity_calibration: FitQuality
    holdout: FitQuality | None = None
    identity_holdout: FitQuality | None = None
    choice: KindChoice | None = None

    def summary(self) -> dict:
        def rel(q: FitQuality | None) -> float | None:
            return None if q is None else q.relative_error

        return {
            "span": str(self.span),
            "kind": self.map.kind,
            "condition_number": None if self.diagnostics is None else self.diagnostics.condition_number,
            "ridge_lambda": None if self.diagnostics is None else self.diagnostics.ridge_lambda,
            "solver": None if self.diagnostics is None else self.diagnostics.method,
            "calibration_relative_error": self.calibration.relative_error,
            "calibration_r2": self.calibration.r2,
            "identity_calibration_relative_error": self.identity_calibration.relative_error,
            "holdout_relative_error": rel(self.holdout),
            "identity_holdout_relative_error": rel(self.identity_holdout),
        } | ({} if self.choice is None else {"auto": {"holdout_error": self.choice.holdout_errors,
                                                       "chosen": self.choice.chosen}})


def solve_plan(
    calibration: Mapping[Span, SpanStats],
    holdout: Mapping[Span, SpanStats] | None = None,
    *,
    bias: bool = True,
    ridge: float = 0.0,
    identity: Collection[Span] = (),
    priors: Mapping[Span, LinearMap] | None = None,
    ridge_lambdas: Mapping[Span, float] | None = None,
    shrink_bias: bool = False,
    map_kind: str = "linear",
) -> dict[Span, SpanFit]:
    """Fit every span from (merged) statistics; spans in `identity` just drop their blocks.

    `map_kind` names the pair the statistics were summed on (`ViTAdapter.span_pairs`) and so what the
    fitted maps are: ``folded`` maps are folded into block s. The identity map on a folded pair (r ≈ m)
    is dropping the blocks too, so the identity columns mean the same for both kinds.

    `priors` are what each span's ridge shrinks toward (default zero); `ridge_lambdas` replace the
    relative `ridge` per span by an absolute λ (chosen from the noise level in private runs).
    """
    fits = {}
    for span, stats in sorted(calibration.items()):
        skip = LinearMap.identity(stats.dim)
        linear_map, diagnostics = (skip, None) if span in identity else solve_span(
            stats, bias=bias, ridge=ridge, ridge_lambda=(ridge_lambdas or {}).get(span), prior=(priors or {}).get(span),
            shrink_bias=shrink_bias)
        if map_kind == "folded" and linear_map.kind == "linear":
            linear_map = LinearMap(linear_map.weight, linear_map.bias, "folded")
        held = holdout.get(span) if holdout is not None else None
        has_held = held is not None and held.tokens > 0
        fit = fits[span] = SpanFit(
            span=span,
            map=linear_map,
            diagnostics=diagnostics,
            calibration=fit_quality(stats, linear_map),
            identity_calibration=fit_quality(stats, skip),
            holdout=fit_quality(held, linear_map) if has_held else None,
            identity_holdout=fit_quality(held, skip) if has_held else None,
        )
        if fit.holdout is not None and fit.identity_holdout is not None and linear_map.kind != "identity" \
                and fit.holdout.relative_error >= fit.identity_holdout.relative_error:
            _logger.warning("span %s: the fitted map (held-out error %.4g) is no better than dropping the blocks "
                            "(%.4g); consider identity_spans: %s", span, fit.holdout.relative_error,
                            fit.identity_holdout.relative_error, span)
    return fits


def solve_kinds(
    calibration: Mapping[str, Mapping[Span, SpanStats]],
    holdout: Mapping[str, Mapping[Span, SpanStats]] | None = None,
    *,
    map_kind: str = "linear",
    priors: Mapping[str, Mapping[Span, LinearMap]] | None = None,
    ridge_lambdas: Mapping[str, Mapping[Span, float]] | None = None,
    **solve: Any,
) -> dict[Span, SpanFit]:
    """`solve_plan` on the statistics of each kind the run's `map_kind` collected (`collected_kinds`), keyed by
    kind. ``auto`` solves both kinds and keeps, per span, the fit with the lower held-out error of the span's
    output (`KindChoice`, recorded in the report); a tie goes to ``folded``, which adds no parameters."""
    kinds = collected_kinds(map_kind)
    fits = {kind: solve_plan(calibration[kind], None if holdout is None else holdout[kind], map_kind=kind,
                             priors=(priors or {}).get(kind), ridge_lambdas=(ridge_lambdas or {}).get(kind), **solve)
            for kind in kinds}
    if map_kind != "auto":
        return fits[map_kind]
    chosen = {}
    for span, linear in fits["linear"].items():
        if linear.map.kind == "identity":
            chosen[span] = linear
            continue
        if any(fits[kind][span].holdout is None for kind in kinds):
            raise TBAInputError("map", "auto picks each span's kind by its held-out error, and no image was held out",
                                "hold images out (holdout fraction above 0) or set map: linear or folded")
        assert holdout is not None
        energy = max(float(holdout["linear"][span].sum_yy), 1e-300)  # Σ‖x_e‖² over the held-out tokens
        # the unclamped estimates: a private release's noisy held-out sums can take both below zero (post-processing)
        errors = {kind: fits[kind][span].holdout.estimate / energy for kind in kinds}  # type: ignore[union-attr]
        kind = min(kinds, key=lambda k: (errors[k], k != "folded"))
        chosen[span] = replace(fits[kind][span], choice=KindChoice(errors, kind))
        _logger.info("span %s: held-out error linear %.4g, folded %.4g: %s", span, errors["linear"],
                     errors["folded"], kind)
    return chosen


def span_kinds(fits: Mapping[Span, SpanFit]) -> dict[Span, str]:
    """Each span's map kind as fitted (``identity`` for a dropped span)."""
    return {span: fit.map.kind for span, fit in fits.items()}


@dataclass
class Compression:
    """A compressed model with everything needed to report on it and save it.

    The model itself is built from `base` and the maps on first use: saving and reporting need only the maps, and
    building copies the base weights (`build_compressed`), which would raise ``tba-fed compress``'s peak memory.
    """

    base: nn.Module
    plan: Plan
    fits: dict[Span, SpanFit]
    parameters: ParameterReport
    token_mode: str
    bias: bool
    ridge: float
    calibration_images: int
    holdout_images: int
    source: ModelConfig | None = None
    map_kind: str = "linear"

    @cached_property
    def model(self) -> nn.Module:
        return build_compressed(self.base, {span: fit.map for span, fit in self.fits.items()})

    @cached_property
    def flops(self) -> FlopReport:
        return flop_report(self.base, self.model)


def analyze(model: nn.Module, batches: Iterable, *, token_mode: str = "all",
            device: str | torch.device = "cpu") -> SimilarityStats:
    """Similarity of every block pair over the images in `batches`."""
    return collect_similarity(ViTAdapter(model), batches, token_mode=token_mode, device=device)


def choose_plan(model: nn.Module, similarity: SimilarityStats, *, blocks: int | None = None, params: int | None = None,
                metric: str = "mse", bias: bool = True, map_kind: str = "linear") -> Plan:
    """Cheapest non-overlapping spans for a budget of blocks or (net) parameters (a folded map costs none; under
    ``auto`` a span's kind is not known yet, so each is counted as a linear map: the budget holds either way)."""
    adapter = ViTAdapter(model)
    d = adapter.embed_dim
    map_params = 0 if map_kind == "folded" else d * d + (d if bias else 0)
    return select_plan(similarity.metric(metric), blocks=blocks, params=params,
                       block_params=adapter.block_parameter_count(0), map_params=map_params)


def calibrate(
    model: nn.Module,
    plan: Plan | str,
    calibration: Iterable,
    holdout: Iterable | None = None,
    *,
    token_mode: str = "all",
    bias: bool = True,
    ridge: float = 0.0,
    identity: Collection[Span] | str = (),
    device: str | torch.device = "cpu",
    source: ModelConfig | None = None,
    map_kind: str = "linear",
) -> Compression:
    """Fit the plan's maps on `calibration` batches and build the compressed model.

    `holdout` batches (never used in the fit) measure each map against simply dropping its blocks.
    `map_kind`: ``linear`` (x_s -> x_e, one added map per span), ``folded`` (block s's MLP branch ->
    x_e − h_s, folded into its fc2: zero added parameters) or ``auto`` (both kinds' statistics from the same
    passes, each span gets the kind with the lower held-out error: needs `holdout`); identity spans drop their
    blocks either way.
    """
    adapter = ViTAdapter(model)
    if isinstance(plan, str):
        plan = parse_plan(plan, adapter.num_blocks)
    if isinstance(identity, str):
        identity = parse_plan(identity, adapter.num_blocks, field="identity_spans").spans if identity.strip() else ()
    if unknown := [str(s) for s in identity if s not in plan.spans]:
        raise TBAInputError("identity_spans", f"{', '.join(unknown)} not in the plan {plan}")
    kinds = collected_kinds(map_kind)
    if map_kind == "auto" and holdout is None:
        raise TBAInputError("map", "auto picks each span's kind by its held-out error, and no image was held out",
                            "hold images out (holdout fraction above 0) or set map: linear or folded")
    calib = collect_kind_stats(adapter, calibration, plan.spans, kinds, token_mode=token_mode, device=device)
    held = collect_kind_stats(adapter, holdout, plan.spans, kinds, token_mode=token_mode, device=device) \
        if holdout is not None else None
    fits = solve_kinds(calib, held, map_kind=map_kind, bias=bias, ridge=ridge, identity=frozenset(identity))
    first = plan.spans[0]
    return Compression(
        base=model,
        plan=plan,
        fits=fits,
        parameters=parameter_report(model, plan, bias=bias, identity=frozenset(identity), map_kind=span_kinds(fits)),
        token_mode=token_mode,
        bias=bias,
        ridge=ridge,
        calibration_images=calib[kinds[0]][first].images,
        holdout_images=0 if held is None else held[kinds[0]][first].images,
        source=source,
        map_kind=map_kind,
    )
