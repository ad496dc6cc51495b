"""Folded maps (map: folded): fitted on block s's MLP branch, folded into its fc2 and LayerScale, zero added
parameters; the compressed model is a stock timm ViT of depth L − k. Tiny random ViTs with and without
LayerScale; the real architectures' parameter counts with random weights (no download)."""

from __future__ import annotations

import timm
import torch
import pytest
import yaml
from timm.models.vision_transformer import Block

from tba_fed import ModelConfig, ViTAdapter, calibrate, create_model, load_compressed, save_compressed, solve_plan
from tba_fed.calibrate import collect_span_stats
from tba_fed.compressed import build_compressed, parameter_report
from tba_fed.errors import TBAInputError
from tba_fed.plan import Plan, Span, parse_plan
from tba_fed.privacy.clipped import STATISTICS, image_norms, residual
from tba_fed.privacy.public_prior import public_prior_maps, public_span_bounds
from tba_fed.solver import LinearMap

from conftest import TINY, loader

CONFIGS = {
    "plain": ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY),
    "layerscale": ModelConfig(name="vit_tiny_patch16_224", kwargs={**TINY, "init_values": 0.1}),
}


def _model(which: str) -> torch.nn.Module:
    return create_model(CONFIGS[which]).eval()


def _halves_by_hand(block: Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h and m from the block's own modules (eval: drop_path is the identity), independent of the adapter."""
    h = x + block.ls1(block.attn(block.norm1(x)))
    return h, block.ls2(block.mlp(block.norm2(h)))


def _unfused(model: torch.nn.Module, maps: dict[Span, LinearMap], images: torch.Tensor) -> torch.Tensor:
    """The unfused computation: each span's block s as h + m T + c, then the kept blocks, then the head."""
    adapter = ViTAdapter(model)
    x = adapter.embed(images)
    index = 0
    for span in sorted(maps):
        x = adapter.run_blocks(x, index, span.start)
        h, m = _halves_by_hand(model.blocks[span.start], x)
        x = h + maps[span].apply(m.double()).to(x.dtype)
        index = span.end + 1
    return adapter.head(adapter.run_blocks(x, index, adapter.num_blocks))


@pytest.mark.parametrize("which", CONFIGS)
def test_block_halves_are_timms_block(which):
    model = _model(which)
    adapter = ViTAdapter(model)
    images = next(iter(loader(4)))[0]
    with torch.no_grad():
        x = adapter.run_blocks(adapter.embed(images), 0, 2)
        h, m = adapter.block_halves(2, x)
        assert torch.equal(h + m, model.blocks[2](x))
        hand_h, hand_m = _halves_by_hand(model.blocks[2], x)
        assert torch.equal(h, hand_h) and torch.equal(m, hand_m)
        assert not torch.allclose(m, torch.zeros_like(m))


@pytest.mark.parametrize("which", CONFIGS)
def test_folded_statistics_are_the_sums_of_the_mlp_branch_and_the_target_minus_h(which):
    model = _model(which)
    adapter = ViTAdapter(model)
    span = Span(1, 3)
    stats = collect_span_stats(adapter, loader(12), [span], map_kind="folded")[span]
    ms, rs = [], []
    with torch.no_grad():
        for images, _ in loader(12):
            x1 = adapter.run_blocks(adapter.embed(images), 0, 1)
            h, m = _halves_by_hand(model.blocks[1], x1)
            x3 = adapter.run_blocks(h + m, 2, 4)
            ms.append(m.reshape(-1, m.shape[-1]).double())
            rs.append((x3 - h).reshape(-1, m.shape[-1]).double())
    m, r = torch.cat(ms), torch.cat(rs)
    assert stats.tokens == m.shape[0] and stats.images == 12
    assert torch.allclose(stats.gram, m.T @ m, rtol=1e-10, atol=1e-8)
    assert torch.allclose(stats.cross, m.T @ r, rtol=1e-10, atol=1e-8)
    assert torch.allclose(stats.sum_x, m.sum(0)) and torch.allclose(stats.sum_y, r.sum(0))
    assert torch.allclose(stats.sum_yy, r.square().sum())
    linear = collect_span_stats(adapter, loader(12), [span])[span]  # the linear pair is another one
    assert not torch.allclose(linear.gram, stats.gram)


@pytest.mark.parametrize("which", CONFIGS)
def test_folded_model_is_the_unfused_map_and_a_stock_timm_vit(which):
    model = _model(which)
    result = calibrate(model, "0->1, 2->4", loader(24), loader(8, seed=5), map_kind="folded", source=CONFIGS[which])
    maps = {span: fit.map for span, fit in result.fits.items()}
    assert {m.kind for m in maps.values()} == {"folded"}
    folded = result.model
    # stock: every block is timm's Block, depth L − k, and timm's own model of that depth loads it strictly
    assert [type(b) for b in folded.blocks] == [Block] * 3
    stock = timm.create_model(CONFIGS[which].name, pretrained=False, **{**CONFIGS[which].kwargs, "depth": 3}).eval()
    stock.load_state_dict(folded.state_dict(), strict=True)
    if which == "layerscale":
        assert all(torch.equal(b.ls2.gamma, torch.ones_like(b.ls2.gamma)) for b in (folded.blocks[0], folded.blocks[1]))
        assert not torch.equal(model.blocks[0].ls2.gamma, torch.ones_like(model.blocks[0].ls2.gamma))  # untouched
    images = next(iter(loader(8, seed=9)))[0]
    with torch.no_grad():
        out = folded(images)
        assert torch.equal(stock(images), out)
        expected = _unfused(model, maps, images)
        assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5), float((out - expected).abs().max())
        assert not torch.allclose(out, model(images), atol=1e-3)  # the blocks were really removed
    # zero added parameters: exactly the removed blocks' parameters are gone
    removed = sum(p.numel() for i in (1, 3, 4) for p in model.blocks[i].parameters())
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in folded.parameters()) == removed
    assert result.parameters.removed == removed and all(row.map_params == 0 for row in result.parameters.spans)


def test_a_folded_plan_can_drop_some_spans_without_a_map():
    model = _model("layerscale")
    result = calibrate(model, "0->1, 2->4", loader(16), map_kind="folded", identity="2->4")
    kinds = {str(span): fit.map.kind for span, fit in result.fits.items()}
    assert kinds == {"0->1": "folded", "2->4": "identity"}
    assert [r.map_params for r in result.parameters.spans] == [0, 0]
    images = next(iter(loader(4, seed=3)))[0]
    maps = {span: fit.map for span, fit in result.fits.items()}
    with torch.no_grad():
        adapter = ViTAdapter(model)
        x = adapter.embed(images)
        h, m = _halves_by_hand(model.blocks[0], x)
        x = h + maps[Span(0, 1)].apply(m.double()).float()
        x = adapter.run_blocks(adapter.run_blocks(x, 2, 3), 5, 6)  # block 1 folded away, 3 and 4 dropped
        expected = adapter.head(x)
        assert torch.allclose(result.model(images), expected, atol=1e-5)


@pytest.mark.parametrize("name, removed", [("deit_small_patch16_224", 1_774_464),
                                           ("vit_small_patch14_dinov2", 1_775_232)])  # the latter has LayerScale
def test_a_folded_one_block_span_removes_exactly_that_blocks_parameters(name, removed):
    model = timm.create_model(name, pretrained=False).eval()
    dim = model.embed_dim
    plan = Plan((Span(3, 4),))
    report = parameter_report(model, plan, bias=True, map_kind="folded")
    assert report.removed == removed and report.spans[0].map_params == 0
    assert parameter_report(model, plan, bias=True).removed == removed - dim * dim - dim  # a linear map adds d²+d
    generator = torch.Generator().manual_seed(0)
    folded = build_compressed(model, {Span(3, 4): LinearMap(torch.randn(dim, dim, dtype=torch.float64, generator=generator),
                                                            torch.randn(dim, dtype=torch.float64, generator=generator),
                                                            "folded")})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) - count(folded) == removed == report.removed
    assert len(folded.blocks) == len(model.blocks) - 1 and all(type(b) is Block for b in folded.blocks)


def test_save_and_load_round_trip_rebuilds_the_folded_model(tmp_path):
    config = CONFIGS["layerscale"]
    result = calibrate(_model("layerscale"), "1->3", loader(16), map_kind="folded", source=config)
    save_compressed(result, tmp_path / "out")
    manifest = yaml.safe_load((tmp_path / "out" / "manifest.yaml").read_text())
    assert manifest["map"] == "folded" and manifest["identity_spans"] == []
    loaded = load_compressed(tmp_path / "out")
    assert [type(b) for b in loaded.blocks] == [Block] * 4
    images = next(iter(loader(4, seed=2)))[0]
    with torch.no_grad():
        assert torch.equal(loaded(images), result.model(images))
    # the manifest's kind decides how the same maps are built: read as linear, they make another model
    manifest["map"] = "linear"
    (tmp_path / "out" / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    as_linear = load_compressed(tmp_path / "out")
    assert len(as_linear.blocks) == 5
    with torch.no_grad():
        assert not torch.allclose(as_linear(images), result.model(images), atol=1e-3)
    manifest["map"] = "fused"
    (tmp_path / "out" / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(TBAInputError, match="manifest.map"):
        load_compressed(tmp_path / "out")


def test_folding_refuses_a_block_it_cannot_fold_into():
    model = _model("plain")
    dim = model.embed_dim
    model.blocks[1].mlp.fc2 = torch.nn.Identity()
    with pytest.raises(TBAInputError, match="fc2"):
        build_compressed(model, {Span(1, 2): LinearMap(torch.eye(dim, dtype=torch.float64), None, "folded")})
    with pytest.raises(TBAInputError, match="map"):
        calibrate(_model("plain"), "1->2", loader(8), map_kind="fused")


def test_public_clipping_bounds_are_set_on_the_folded_pairs():
    model = _model("layerscale")
    spans = [Span(1, 2)]
    priors = public_prior_maps(model, loader(8), spans, "all", True, ("folded",))
    bounds = public_span_bounds(model, loader(16, seed=4), spans, priors, "all", 2.0)["folded"][spans[0]]
    adapter = ViTAdapter(model)
    norms: dict[str, list[torch.Tensor]] = {k: [] for k in STATISTICS}
    with torch.no_grad():
        for images, _ in loader(16, seed=4):
            x1 = adapter.run_blocks(adapter.embed(images), 0, 1)
            h, m = _halves_by_hand(model.blocks[1], x1)
            r = model.blocks[2](h + m) - h
            for k, v in image_norms(m.double(), residual(m.double(), r.double(), priors["folded"][spans[0]])).items():
                norms[k].append(v)
    expected = tuple(float(torch.cat(norms[k]).median()) * 2.0 for k in STATISTICS)
    assert bounds.as_tuple() == pytest.approx(expected, rel=1e-9)
    linear = public_span_bounds(model, loader(16, seed=4), spans, {"linear": priors["folded"]}, "all", 2.0)["linear"][spans[0]]
    assert linear.as_tuple()[0] != pytest.approx(expected[0], rel=1e-3)


@pytest.mark.usefixtures("server_identity")
def test_federated_exact_folded_run_equals_the_centralised_fit(tmp_path):
    from cluster import assert_maps_equal
    from tba_fed.federation.site import cached_model
    from test_server_rounds import MODEL, exact_two_site_run

    report = exact_two_site_run(tmp_path, "folded")
    model = cached_model(MODEL.model_dump_json())
    batches = list(loader(24, seed=1)) + list(loader(24, seed=2))
    plan = parse_plan("1->2, 3->5", 6)
    central = solve_plan(collect_span_stats(ViTAdapter(model), batches, plan.spans, map_kind="folded"), bias=True,
                         map_kind="folded")
    assert_maps_equal(tmp_path / "server", central)
    linear = solve_plan(collect_span_stats(ViTAdapter(model), batches, plan.spans), bias=True)
    assert not torch.allclose(linear[Span(1, 2)].map.weight, central[Span(1, 2)].map.weight, atol=1e-3)
    assert report["map"] == "folded" and all(row["map_params"] == 0 for row in report["parameters"]["spans"])
    assert report["evaluation"]["test_images"] == 16
    for site in ("site-1", "site-2"):  # each site installed the same stock model of depth 3
        installed = load_compressed(tmp_path / site / "compressed")
        assert [type(b) for b in installed.blocks] == [Block] * 3
    server_model = load_compressed(tmp_path / "server")
    images = next(iter(loader(4, seed=7)))[0]
    with torch.no_grad():
        assert torch.equal(installed(images), server_model(images))


@pytest.mark.usefixtures("server_identity")
def test_private_folded_run_clips_the_folded_pairs_to_bounds_set_on_them(tmp_path):
    from tba_fed.federation.config import load_federated_config
    from tba_fed.federation.server import run_server
    from tba_fed.federation.site import cached_model
    from tba_fed.privacy.ledger import PrivacyLedger
    from tba_fed.public_images import public_loader
    from test_server_rounds import MODEL, InProcessGrid

    grid = InProcessGrid(tmp_path, {1: "good", 2: "good"}, images=40)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL.model_dump(mode="json"), "plan": "1->2", "map": "folded",
                                    "federation": {"num_sites": 2, "min_sites": 2, "round_timeout": 5},
                                    "privacy": {"epsilon": 4.0, "seed": 5, "public_images": 32},
                                    "output": str(tmp_path / "server")}))
    report = run_server(grid, load_federated_config(path))
    model = cached_model(MODEL.model_dump_json())
    spans = [Span(1, 2)]
    priors = public_prior_maps(model, public_loader(model, 32), spans, "all", True, ("folded",))
    expected = public_span_bounds(model, public_loader(model, 32, seed=1), spans, priors, "all", 1.0)["folded"]
    linear = public_span_bounds(model, public_loader(model, 32, seed=1), spans, {"linear": priors["folded"]}, "all",
                                1.0)["linear"]
    assert report["privacy"]["clip_spans"]["1->2"] == pytest.approx(list(expected[spans[0]].as_tuple()), rel=1e-9)
    assert report["privacy"]["clip_spans"]["1->2"][0] != pytest.approx(linear[spans[0]].as_tuple()[0], rel=1e-3)
    assert report["map"] == "folded" and report["spans"][0]["kind"] == "folded"
    for site in grid.sites.values():
        assert [e.release for e in PrivacyLedger(site.policy.ledger).entries()] == ["statistics"]
    assert [type(b) for b in load_compressed(tmp_path / "server").blocks] == [Block] * 5


def test_the_clipped_pass_sums_the_folded_pairs():
    from tba_fed.privacy.clipped import SpanBounds
    from tba_fed.privacy.passes import collect_clipped_kind_sums

    model = _model("layerscale")
    adapter = ViTAdapter(model)
    span, dim = Span(1, 3), model.embed_dim
    zero = LinearMap(torch.zeros(dim, dim, dtype=torch.float64), None)
    loose = SpanBounds(*(1e30,) * len(STATISTICS))  # nothing clipped: the weighted sums are the plain ones
    clipped = collect_clipped_kind_sums(adapter, loader(8), [span], token_mode="all", bounds={"folded": {span: loose}},
                                        priors={"folded": {span: zero}})["folded"][span]
    exact = collect_span_stats(adapter, loader(8), [span], map_kind="folded")[span]
    assert clipped.clipped == 0 and float(clipped.weight) == 8
    assert torch.allclose(clipped.gram, exact.gram, rtol=1e-12) and torch.allclose(clipped.cross_residual, exact.cross)
    assert torch.allclose(clipped.sum_rr, exact.sum_yy)


def test_cli_compress_with_map_folded_writes_a_folded_model(tmp_path, capsys):
    from tba_fed.cli import main

    flags = ["--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg", "patch_size=8",
             "--model-arg", "depth=6", "--model-arg", "embed_dim=48", "--model-arg", "num_heads=3"]
    out = tmp_path / "out"
    assert main(["compress", *flags, "--num-images", "12", "--plan", "1->2, 3->4", "--map", "folded", "-o", str(out)]) == 0
    assert "map `folded`" in capsys.readouterr().out
    assert yaml.safe_load((out / "manifest.yaml").read_text())["map"] == "folded"
    assert [type(b) for b in load_compressed(out).blocks] == [Block] * 4
    config = tmp_path / "run.yaml"
    config.write_text("map: fused\n")
    assert main(["compress", "--config", str(config), *flags, "--plan", "1->2", "-o", str(tmp_path / "bad")]) == 2
    assert "map:" in capsys.readouterr().err and not (tmp_path / "bad").exists()
