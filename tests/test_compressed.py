import pytest
import timm
import torch
from torch import nn

from tba_fed import (BlockApproximation, LinearMap, Span, TBAInputError, ViTAdapter, build_compressed,
                     calibrate, create_model, load_compressed, parameter_report, parse_plan, save_compressed)

from conftest import loader


class AffineBlock(nn.Module):
    """A 'block' that is exactly affine, so TBA must reproduce it."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.eye(dim) + 0.1 * torch.randn(dim, dim, generator=gen))
        self.bias = nn.Parameter(0.1 * torch.randn(dim, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_exactly_linear_blocks_are_reproduced(tiny_vit, dtype, tolerance):
    tiny_vit.blocks[2] = AffineBlock(48, 1)
    tiny_vit.blocks[3] = AffineBlock(48, 2)
    tiny_vit.to(dtype)
    result = calibrate(tiny_vit, "1->3", loader(), loader(8, seed=1), bias=True)
    images = next(iter(loader(8, seed=2)))[0].to(dtype)
    with torch.no_grad():
        for forward in ("forward", "forward_features"):
            got, expected = getattr(result.model, forward)(images), getattr(tiny_vit, forward)(images)
            assert float((got - expected).abs().max() / expected.abs().max()) < tolerance
    assert result.fits[Span(1, 3)].holdout.relative_error < 1e-10


def test_output_equals_hand_composition(tiny_vit):
    result = calibrate(tiny_vit, "1->2, 3->5", loader(), bias=True)
    adapter = ViTAdapter(tiny_vit)
    maps = {span: fit.map for span, fit in result.fits.items()}
    images = next(iter(loader(4, seed=3)))[0]
    with torch.no_grad():
        x = adapter.run_blocks(adapter.embed(images), 0, 2)
        x = maps[Span(1, 2)].apply(x.double()).float()
        x = adapter.run_blocks(x, 3, 4)
        x = maps[Span(3, 5)].apply(x.double()).float()
        expected = adapter.head(x)
        got = result.model(images)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert len(result.model.blocks) == 6 - 3 + 2
    assert isinstance(result.model.blocks[2], BlockApproximation)
    assert sum(p.numel() for p in result.model.parameters()) == result.parameters.compressed
    assert tiny_vit.blocks[2].__class__.__name__ == "Block"  # the original model is untouched


@pytest.mark.parametrize("bias,expected", [(True, 1_626_624), (False, 1_627_008)])
def test_deit_small_single_block_parameters(bias, expected):
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    report = parameter_report(model, parse_plan("3->4", 12), bias=bias)
    assert report.spans[0].block_params == 1_774_464
    assert report.removed == expected
    assert report.paper_removed == 1_626_624
    two = parameter_report(model, parse_plan("2->4", 12), bias=True)
    assert two.removed == 2 * 1_774_464 - 147_840 and two.paper_removed == 2 * 1_626_624
    identity = parameter_report(model, parse_plan("2->4", 12), bias=True, identity=frozenset({Span(2, 4)}))
    assert identity.removed == 2 * 1_774_464


def test_save_load_is_bitwise_identical(tmp_path, tiny_config):
    model = create_model(tiny_config)
    result = calibrate(model, "0->1, 2->4", loader(), loader(8, seed=1), identity="0->1", source=tiny_config)
    out = save_compressed(result, tmp_path / "compressed")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.yaml", "maps.safetensors", "report.html", "report.json",
                                                     "report.md", "tba-fed-output.json"]
    loaded = load_compressed(out)
    images = next(iter(loader(8, seed=4)))[0]
    with torch.no_grad():
        assert torch.equal(loaded(images), result.model(images))
    assert len(loaded.blocks) == 6 - 1 - 2 + 1  # 0->1 dropped: no module; 2->4: one map
    assert [type(b).__name__ for b in loaded.blocks] == ["Block", "Block", "BlockApproximation", "Block"]
    from safetensors.torch import load_file

    tensors = load_file(str(out / "maps.safetensors"))
    assert set(tensors) == {"span.2-4.weight", "span.2-4.bias"}
    assert tensors["span.2-4.weight"].shape == (48, 48)


def test_failed_save_leaves_nothing(tmp_path, tiny_config, monkeypatch):
    model = create_model(tiny_config)
    result = calibrate(model, "0->1", loader(), source=tiny_config)
    import tba_fed.checkpoint as checkpoint

    def broken(*args, **kwargs):
        raise OSError("disk full")

    # fails after maps.safetensors has been written into the temporary directory
    monkeypatch.setattr(checkpoint.yaml, "safe_dump", broken)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(result, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    save_compressed(result, tmp_path / "out2")
    with pytest.raises(TBAInputError, match="already exists"):
        save_compressed(result, tmp_path / "out2")


def test_build_rejects_bad_plans(tiny_vit):
    eye = LinearMap.identity(48)
    with pytest.raises(TBAInputError, match="plan: span 4->9"):
        build_compressed(tiny_vit, {Span(4, 9): eye})
    with pytest.raises(TBAInputError, match="identity_spans"):
        calibrate(tiny_vit, "1->2", loader(), identity="3->4")
    with pytest.raises(TBAInputError, match="model: ResNet"):
        build_compressed(timm.create_model("resnet18"), {Span(0, 1): eye})
