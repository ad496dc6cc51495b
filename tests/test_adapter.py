import pytest
import timm
import torch

from tba_fed import TBAInputError, ViTAdapter, create_model

from conftest import FAMILIES, loader


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_embed_blocks_head_equals_timm_forward(family):
    model = create_model(FAMILIES[family])
    adapter = ViTAdapter(model)
    size = model.patch_embed.img_size[0]
    images = next(iter(loader(3, size=size)))[0]
    with torch.no_grad():
        outputs = list(adapter.iter_block_outputs(images, adapter.num_blocks - 1))
        assert torch.equal(adapter.head(outputs[-1]), model(images))
        assert torch.equal(adapter.run_blocks(adapter.embed(images), 0, 6), outputs[-1])
    expected_prefix = {"vit": 1, "deit_distilled": 2, "dinov2_reg": 5}[family]
    assert adapter.num_prefix_tokens == expected_prefix
    tokens = outputs[0].shape[1]
    assert adapter.select_tokens(outputs[0], "all").shape == (3 * tokens, 48)
    assert adapter.select_tokens(outputs[0], "cls").shape == (3, 48)
    assert adapter.select_tokens(outputs[0], "patch").shape == (3 * (tokens - expected_prefix), 48)
    assert torch.equal(adapter.select_tokens(outputs[0], "cls"), outputs[0][:, 0])
    for mode in ("all", "cls", "patch"):  # per image: the rows a private release bounds together
        per_image = adapter.image_tokens(outputs[0], mode)
        assert per_image.shape == (3, adapter.tokens_per_image(mode), 48)
        assert torch.equal(per_image.reshape(-1, 48), adapter.select_tokens(outputs[0], mode))


def test_forward_stops_after_last_needed_block(tiny_vit):
    calls = []
    for i, block in enumerate(tiny_vit.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    adapter = ViTAdapter(tiny_vit)
    with torch.no_grad():
        outputs = list(adapter.iter_block_outputs(next(iter(loader(2)))[0], 2))
    assert len(outputs) == 3 and calls == [0, 1, 2]
    with pytest.raises(TBAInputError, match="block 6 is out of range"):
        next(adapter.iter_block_outputs(torch.zeros(1, 3, 32, 32), 6))


def test_non_vit_and_bad_token_mode_are_rejected(tiny_vit):
    with pytest.raises(TBAInputError, match="model: ResNet is not a timm VisionTransformer"):
        ViTAdapter(timm.create_model("resnet18"))
    with pytest.raises(TBAInputError, match="token_mode: unknown token mode 'first'"):
        ViTAdapter(tiny_vit).select_tokens(torch.zeros(1, 17, 48), "first")
    no_cls = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48,
                               num_heads=3, class_token=False, global_pool="avg")
    with pytest.raises(TBAInputError, match="cls needs a model with a class token"):
        ViTAdapter(no_cls).check_token_mode("cls")
