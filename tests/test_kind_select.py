"""map: auto: both kinds' statistics from one pass, each span gets the kind with the lower held-out error of its
output (checked against errors measured on the built models' activations), centrally and federated (exact =
centralised to 1e-9); a plan of folded and dropped spans is a stock timm ViT. Tiny random ViTs."""

from __future__ import annotations

from pathlib import Path

import timm
import pytest
import torch
import yaml
from timm.models.vision_transformer import Block, VisionTransformer

from tba_fed import ModelConfig, ViTAdapter, calibrate, create_model, load_compressed, save_compressed
from tba_fed.calibrate import collect_kind_stats, collect_span_stats
from tba_fed.checkpoint import open_compressed
from tba_fed.compressed import build_compressed
from tba_fed.config import RunConfig, validate
from tba_fed.errors import TBAInputError
from tba_fed.export import stock_timm_model
from tba_fed.pipeline import solve_kinds
from tba_fed.plan import Span, parse_plan

from conftest import TINY, loader

LAYERSCALE = ModelConfig(name="vit_tiny_patch16_224", kwargs={**TINY, "init_values": 0.1})
PLAN = "0->1, 2->4"


def _model(silent_mlp: int | None = None) -> torch.nn.Module:
    """The tiny LayerScale ViT; `silent_mlp`: that block's MLP branch zeroed (m_s = 0), so a folded map can only
    add a constant there while a linear map still sees x_s: the linear kind must win that span."""
    model = create_model(LAYERSCALE).eval()
    if silent_mlp is not None:
        with torch.no_grad():
            model.blocks[silent_mlp].mlp.fc2.weight.zero_()
            model.blocks[silent_mlp].mlp.fc2.bias.zero_()
    return model


def _measured_error(model: torch.nn.Module, span: Span, fit_map, images: torch.Tensor) -> tuple[float, float]:
    """(Σ‖x_e − x̂_e‖², Σ‖x_e‖²) on the activations themselves: x̂_e read off the model built with only this span's
    map (a linear map: the BlockApproximation's output; a folded one: the folded block s's)."""
    compressed = build_compressed(model, {span: fit_map})
    index = span.start + (1 if fit_map.kind == "linear" else 0)
    with torch.no_grad():
        target = list(ViTAdapter(model).iter_block_outputs(images, span.end))[-1].double()
        x = ViTAdapter(compressed).embed(images)
        for block in compressed.blocks[: index + 1]:
            x = block(x)
    return float((target - x.double()).square().sum()), float(target.square().sum())


@pytest.mark.parametrize("silent_mlp, expected", [(None, {"0->1": "folded", "2->4": "folded"}),
                                                  (2, {"0->1": "folded", "2->4": "linear"})])
def test_auto_picks_per_span_the_kind_with_the_lower_measured_held_out_error(silent_mlp, expected):
    model = _model(silent_mlp)
    held = loader(16, seed=3, batch_size=16)
    result = calibrate(model, PLAN, loader(24), held, map_kind="auto", source=LAYERSCALE)
    images = next(iter(held))[0]
    chosen = {}
    for span, fit in result.fits.items():
        assert fit.choice is not None
        reported = fit.choice.holdout_errors
        measured = {}
        for kind in ("linear", "folded"):  # each kind's map, refitted alone, measured on the held-out activations
            alone = calibrate(model, str(span), loader(24), map_kind=kind).fits[span].map
            sse, energy = _measured_error(model, span, alone, images)
            measured[kind] = sse / energy
        assert reported == pytest.approx(measured, rel=1e-4)
        assert fit.choice.chosen == min(measured, key=measured.get) == fit.map.kind
        chosen[str(span)] = fit.map.kind
    assert chosen == expected  # each kind wins somewhere
    assert [row.map_params for row in result.parameters.spans] == [0 if k == "folded" else 48 * 48 + 48
                                                                   for k in expected.values()]
    summary = {row["span"]: row["auto"] for row in (fit.summary() for fit in result.fits.values())}
    assert {s: a["chosen"] for s, a in summary.items()} == expected


def test_auto_keeps_the_order_of_noisy_held_out_errors_that_noise_took_below_zero():
    """A private release's held-out sums are noisy: noise on Σ‖y‖² can take both kinds' held-out residual estimates
    below zero. They stay unbiased estimates, so the choice compares them as they are (clamped at zero they tied,
    and the tie went to folded even where linear was far better)."""
    from dataclasses import replace as with_

    model, spans = _model(silent_mlp=2), parse_plan(PLAN, 6).spans
    kinds = ("linear", "folded")
    calibration = collect_kind_stats(ViTAdapter(model), loader(24), spans, kinds)
    holdout = collect_kind_stats(ViTAdapter(model), loader(16, seed=3), spans, kinds)
    exact = solve_kinds(calibration, holdout, map_kind="auto", bias=True)
    assert {str(s): f.map.kind for s, f in exact.items()} == {"0->1": "folded", "2->4": "linear"}
    shifted = {kind: {} for kind in kinds}
    for span, fit in exact.items():  # the same noise draw on Σ‖y‖² of both kinds: both residuals below zero
        drop = 1.5 * max(fit.choice.holdout_errors.values()) * float(holdout["linear"][span].sum_yy)
        for kind in kinds:
            shifted[kind][span] = with_(holdout[kind][span], sum_yy=holdout[kind][span].sum_yy - drop)
    noisy = solve_kinds(calibration, shifted, map_kind="auto", bias=True)
    for span, fit in noisy.items():
        errors = fit.choice.holdout_errors
        assert max(errors.values()) < 0 and fit.map.kind == exact[span].map.kind, (span, errors)


def test_auto_collects_both_kinds_from_one_forward_pass():
    model = _model()
    adapter = ViTAdapter(model)
    spans = parse_plan(PLAN, 6).spans
    calls = {"embed": 0, "attn": 0}
    model.patch_embed.register_forward_hook(lambda *_: calls.__setitem__("embed", calls["embed"] + 1))
    for block in model.blocks:
        block.attn.register_forward_hook(lambda *_: calls.__setitem__("attn", calls["attn"] + 1))
    both = collect_kind_stats(adapter, loader(24), spans, ("linear", "folded"))
    assert calls == {"embed": 3, "attn": 3 * 5}  # 3 batches, blocks 0..4 each run once per batch
    for kind in ("linear", "folded"):  # and the sums are each kind's own pass's, exactly
        alone = collect_span_stats(adapter, loader(24), spans, map_kind=kind)
        for span in spans:
            assert torch.equal(both[kind][span].gram, alone[span].gram)
            assert torch.equal(both[kind][span].cross, alone[span].cross)
            assert both[kind][span].images == alone[span].images == 24


def test_auto_needs_held_out_images():
    with pytest.raises(TBAInputError, match="map.*held-out"):
        calibrate(_model(), PLAN, loader(8), map_kind="auto")
    with pytest.raises(TBAInputError, match="holdout_fraction"):
        validate(RunConfig, {"model": LAYERSCALE.model_dump(), "plan": PLAN, "map": "auto",
                             "data": {"holdout_fraction": 0.0}})


def test_a_mixed_auto_model_saves_and_loads_with_each_spans_kind(tmp_path):
    model = _model(silent_mlp=2)
    result = calibrate(model, PLAN, loader(24), loader(16, seed=3), map_kind="auto", source=LAYERSCALE)
    save_compressed(result, tmp_path / "out")
    manifest = yaml.safe_load((tmp_path / "out" / "manifest.yaml").read_text())
    assert manifest["map"] == "auto" and manifest["span_maps"] == {"0->1": "folded", "2->4": "linear"}
    report = yaml.safe_load((tmp_path / "out" / "report.json").read_text())
    assert {s["span"]: s["auto"]["chosen"] for s in report["spans"]} == manifest["span_maps"]
    images = next(iter(loader(4, seed=2)))[0]
    loaded = load_compressed(tmp_path / "out")
    assert [type(b).__name__ for b in loaded.blocks] == ["Block", "Block", "BlockApproximation", "Block"]  # 0, 2, map, 5
    # the source rebuilds the base weights (without the zeroed MLP): each span's map is built by its recorded kind
    rebuilt = build_compressed(create_model(LAYERSCALE).eval(), {s: fit.map for s, fit in result.fits.items()})
    with torch.no_grad():
        assert torch.equal(loaded(images), rebuilt(images))
    manifest["span_maps"] = {"0->1": "folded"}  # a fitted span without its kind is refused, naming the field
    (tmp_path / "out" / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(TBAInputError, match="manifest.span_maps"):
        load_compressed(tmp_path / "out")


def test_a_plan_of_folded_and_dropped_spans_is_a_stock_timm_vit(tmp_path):
    model = _model()
    result = calibrate(model, "0->1, 2->4", loader(24), map_kind="folded", identity="2->4", source=LAYERSCALE)
    assert [type(b) for b in result.model.blocks] == [Block] * 3  # no module stands in for the dropped span
    save_compressed(result, tmp_path / "out")
    stock = stock_timm_model(open_compressed(tmp_path / "out")).model
    assert type(stock) is VisionTransformer and len(stock.blocks) == 6 - 3
    plain = timm.create_model(LAYERSCALE.name, pretrained=False, **{**LAYERSCALE.kwargs, "depth": 3}).eval()
    plain.load_state_dict(result.model.state_dict(), strict=True)
    images = next(iter(loader(8, seed=9)))[0]
    with torch.no_grad():
        out = result.model(images)
        assert torch.equal(plain(images), out) and torch.equal(stock(images), out)
        assert not torch.allclose(out, model(images), atol=1e-3)


@pytest.mark.usefixtures("server_identity")
def test_federated_exact_auto_run_equals_the_centralised_fit(tmp_path):
    from cluster import assert_maps_equal
    from tba_fed.federation.site import cached_model
    from test_server_rounds import MODEL, exact_two_site_run

    report = exact_two_site_run(tmp_path, "auto")
    model = cached_model(MODEL.model_dump_json())
    adapter, spans = ViTAdapter(model), parse_plan("1->2, 3->5", 6).spans
    kinds = ("linear", "folded")
    calibration = collect_kind_stats(adapter, list(loader(24, seed=1)) + list(loader(24, seed=2)), spans, kinds)
    holdout = collect_kind_stats(adapter, list(loader(8, seed=101)) + list(loader(8, seed=102)), spans, kinds)
    central = solve_kinds(calibration, holdout, map_kind="auto", bias=True)
    assert_maps_equal(tmp_path / "server", central)
    for row in report["spans"]:
        fit = central[Span(*map(int, row["span"].split("->")))]
        assert row["kind"] == row["auto"]["chosen"] == fit.map.kind
        assert row["auto"]["holdout_error"] == pytest.approx(fit.choice.holdout_errors, rel=1e-9)
    assert report["map"] == "auto" and report["evaluation"]["test_images"] == 16
    server_model = load_compressed(tmp_path / "server")
    images = next(iter(loader(4, seed=7)))[0]
    for site in ("site-1", "site-2"):  # each site built the same model from the span kinds the server sent
        installed = load_compressed(tmp_path / site / "compressed")
        with torch.no_grad():
            assert torch.equal(installed(images), server_model(images))


def _run_yaml(tmp_path: Path, **settings) -> Path:
    from test_server_rounds import MODEL

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL.model_dump(mode="json"), "plan": "1->2", "map": "auto", **settings}))
    return path


def test_auto_under_privacy_needs_a_prior_both_kinds_share_and_held_out_images(tmp_path):
    """Public prior maps are fitted for one kind, and they are the default with privacy: the run says so in one
    line; with prior identity (or zero) the private auto run is accepted; no held-out images is still refused."""
    from tba_fed.federation.config import load_federated_config

    with pytest.raises(TBAInputError, match=r"^prior: .*map: auto fits two \(public is the default with privacy\) "
                                            r"\(set prior: identity or zero") as err:
        load_federated_config(_run_yaml(tmp_path, privacy={"epsilon": 4.0}))
    assert "\n" not in str(err.value)
    config = load_federated_config(_run_yaml(tmp_path, privacy={"epsilon": 4.0}, prior="identity"))
    assert config.map == "auto" and config.prior_kind == "identity"
    with pytest.raises(TBAInputError, match="^map: auto picks each span's kind by its held-out error"):
        load_federated_config(_run_yaml(tmp_path, privacy={"epsilon": 4.0}, prior="zero", data={"holdout_fraction": 0}))


@pytest.mark.usefixtures("server_identity")
def test_a_private_auto_run_releases_both_kinds_once_picks_by_noisy_held_out_error_and_installs_the_kinds(tmp_path):
    """Three in-process sites (the sites' real release code), local DP: one statistics release per site holding
    both kinds' noisy sums (its ledger's noise stds are √2 × a one-kind release's at the same σ), the server picks
    each span's kind by the noisy held-out errors it reports, states the cost, and every site installs those kinds."""
    import math

    from tba_fed.federation.config import load_federated_config
    from tba_fed.federation.server import run_server
    from tba_fed.privacy.accounting import noise_multiplier
    from tba_fed.privacy.ledger import PrivacyLedger
    from test_server_rounds import InProcessGrid

    grid = InProcessGrid(tmp_path, {1: "good", 2: "good", 3: "good"}, images=40)
    path = _run_yaml(tmp_path, plan="1->2, 3->5", prior="identity",
                     federation={"num_sites": 3, "min_sites": 2, "round_timeout": 5},
                     privacy={"epsilon": 8.0, "seed": 11, "public_images": 32}, output=str(tmp_path / "server"))
    report = run_server(grid, load_federated_config(path))
    privacy = report["privacy"]
    sigma = noise_multiplier(8.0, 1e-5, 1)
    assert privacy["releases"] == ["statistics"] and privacy["noise_multiplier"] == pytest.approx(sigma)
    line = "map: auto under privacy: both kinds released, noise std x1.41 per statistic at the same epsilon"
    assert privacy["map_auto"] == line and line in (tmp_path / "server" / "report.md").read_text()
    labels = {f"{kind}/{span}" for kind in ("linear", "folded") for span in ("1->2", "3->5")}
    assert set(privacy["clip_spans"]) == set(privacy["spans"]) == labels
    chosen = {}
    for row in report["spans"]:
        errors = row["auto"]["holdout_error"]
        assert set(errors) == {"linear", "folded"} and all(math.isfinite(e) for e in errors.values())
        assert row["kind"] == row["auto"]["chosen"] == min(errors, key=lambda k: (errors[k], k != "folded"))
        chosen[row["span"]] = row["kind"]
    assert set(report["prior_comparison"]) == {"1->2", "3->5"}
    for site in grid.sites.values():
        (entry,) = PrivacyLedger(site.policy.ledger).entries()  # one release, one entry: both kinds in it
        assert entry.release == "statistics" and entry.noise_multiplier == pytest.approx(sigma)
        for label in labels:  # 2 spans x 2 kinds share G's 0.45: std σ·B/√(0.45/4), √2 × the one-kind σ·B/√(0.45/2)
            assert entry.noise_std[f"{label}:gram"] == pytest.approx(
                math.sqrt(2) * sigma * privacy["clip_spans"][label][0] / math.sqrt(0.45 / 2))
        assert entry.noise_std["weight"] == pytest.approx(sigma / math.sqrt(0.025))  # the count: released once
        manifest = yaml.safe_load((site.output / "compressed" / "manifest.yaml").read_text())
        assert manifest["map"] == "auto" and manifest["span_maps"] == chosen
        images = next(iter(loader(4, seed=7)))[0]
        with torch.no_grad():
            assert torch.equal(load_compressed(site.output / "compressed")(images),
                               load_compressed(tmp_path / "server")(images))
