"""The compressed model: a timm ViT whose blocks s+1..e are replaced by one linear map.

Only ``model.blocks`` is rewritten, so timm's own ``forward``, ``forward_features`` and
``forward_head`` keep working unchanged. A folded map adds no module at all: it is folded into block
s's fc2 and LayerScale; a dropped (identity) span adds none either, so a plan of folded and dropped spans
leaves a stock timm ViT of depth L − k.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import LayerScale
from torch import nn

from .adapter import ViTAdapter
from .errors import TBAInputError
from .plan import Plan, Span, validate_plan
from .solver import LinearMap


class BlockApproximation(nn.Module):
    """Stands in for blocks s+1..e: x -> x Wᵀ + b applied to every token (a linear map; folded and dropped
    spans need no module)."""

    def __init__(self, span: Span, dim: int, *, bias: bool, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.span = span
        self.linear = nn.Linear(dim, dim, bias=bias, dtype=dtype)

    @classmethod
    def from_map(cls, span: Span, linear_map: LinearMap, dtype: torch.dtype = torch.float32) -> BlockApproximation:
        module = cls(span, linear_map.weight.shape[0], bias=linear_map.bias is not None, dtype=dtype)
        with torch.no_grad():
            module.linear.weight.copy_(linear_map.weight.to(dtype))
            if linear_map.bias is not None:
                module.linear.bias.copy_(linear_map.bias.to(dtype))
        return module

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """timm's VisionTransformer passes ``attn_mask`` and ``is_causal`` to its blocks when either is set; a map
        mixes no tokens, so both are accepted and ignored. Named arguments, not ``**kwargs``: TorchScript and
        torch.export take only a fixed signature."""
        return self.linear(x)

    def extra_repr(self) -> str:
        return f"span={self.span}"


def fold_map(adapter: ViTAdapter, span: Span, linear_map: LinearMap) -> None:
    """Fold a map fitted on block s's MLP branch into that block, in place: with z = fc2's output and
    m = γ⊙z = z Γ, the span's output h + m T + c = h + z (Γ T) + c, so fc2.weight ← (Γ T)ᵀ W2,
    fc2.bias ← b2 Γ T + c and γ ← 1 (T = weightᵀ, c = bias; Γ = I without LayerScale). Computed in
    float64 and cast once, so the block keeps timm's shapes and the model stays a stock ViT."""
    block = adapter.foldable_block(span.start)
    fc2 = block.mlp.fc2
    gamma = block.ls2.gamma.detach().to(torch.float64) if isinstance(block.ls2, LayerScale) else None
    w2 = fc2.weight.detach().to(torch.float64)  # [dim, hidden]
    b2 = fc2.bias.detach().to(torch.float64) if fc2.bias is not None else None
    gamma_t = linear_map.weight.T if gamma is None else gamma[:, None] * linear_map.weight.T  # Γ T, [dim, dim]
    weight = gamma_t.T @ w2
    bias = b2 @ gamma_t if b2 is not None else None
    if linear_map.bias is not None:
        bias = linear_map.bias if bias is None else bias + linear_map.bias
    if bias is not None and fc2.bias is None:
        raise TBAInputError(f"maps.span.{span.key}", f"block {span.start}'s fc2 has no bias to fold the map's into",
                            "fit the map without a bias (bias: false)")
    dtype = fc2.weight.dtype
    if not all(torch.isfinite(t.to(dtype)).all() for t in (weight, bias) if t is not None):
        peak = max(float(t.abs().max()) for t in (weight, bias) if t is not None)
        raise TBAInputError(f"maps.span.{span.key}", f"folded entries of up to {peak:.3g} overflow the model's {dtype}")
    with torch.no_grad():
        fc2.weight.copy_(weight.to(dtype))
        if bias is not None:
            fc2.bias.copy_(bias.to(dtype))
        if gamma is not None:
            block.ls2.gamma.fill_(1.0)


def build_compressed(model: nn.Module, maps: Mapping[Span, LinearMap]) -> nn.Module:
    """A copy of `model` with each span's blocks replaced by its map (the original is untouched); a folded
    map is folded into block s and a dropped (identity) span's blocks are simply deleted: neither adds a module.

    Maps are cast from float64 to the model's dtype; one whose entries overflow that dtype is refused
    (it would turn every output into inf or NaN).
    """
    adapter = ViTAdapter(model)
    plan = validate_plan(maps, adapter.num_blocks)
    compressed = copy.deepcopy(model)
    folding = ViTAdapter(compressed)
    dtype = next(model.parameters()).dtype
    new_blocks: list[nn.Module] = []
    index = 0
    for span in plan.spans:
        new_blocks.extend(compressed.blocks[index : span.start + 1])
        index = span.end + 1
        if maps[span].kind == "identity":
            continue
        if maps[span].kind == "folded":
            fold_map(folding, span, maps[span])
            continue
        approximation = BlockApproximation.from_map(span, maps[span], dtype)
        if not all(torch.isfinite(p).all() for p in approximation.linear.parameters()):
            peak = max(float(t.abs().max()) for t in (maps[span].weight, maps[span].bias) if t is not None)
            raise TBAInputError(f"maps.span.{span.key}", f"entries of up to {peak:.3g} overflow the model's {dtype}")
        new_blocks.append(approximation)
    new_blocks.extend(compressed.blocks[index:])
    compressed.blocks = nn.Sequential(*new_blocks)
    return compressed.eval()


@dataclass(frozen=True)
class SpanParameters:
    span: str
    blocks_removed: int
    block_params: int
    map_params: int
    removed: int
    paper_removed: int


@dataclass(frozen=True)
class ParameterReport:
    original: int
    compressed: int
    removed: int
    paper_removed: int
    spans: tuple[SpanParameters, ...]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module) -> int:
    """FLOPs of one forward pass on one image at the model's input size, as torch's FlopCounterMode counts them
    (matmuls, convolutions, attention; 2 per multiply-add). The values of the image do not matter.

    On the CPU, ``scaled_dot_product_attention`` runs ``aten._scaled_dot_product_flash_attention_for_cpu``, which
    torch's counter has no formula for (it counted attention as 0 FLOPs): it is given torch's own SDPA formula."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from .data import data_config

    def sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    image = torch.zeros(1, *data_config(model)["input_size"], dtype=next(model.parameters()).dtype,
                        device=next(model.parameters()).device)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model.eval()(image)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class FlopReport:
    original: int
    compressed: int
    counted: str = "torch.utils.flop_counter.FlopCounterMode, one image at the model's input size"


def flop_report(original: nn.Module, compressed: nn.Module) -> FlopReport:
    return FlopReport(count_flops(original), count_flops(compressed))


def parameter_report(model: nn.Module, plan: Plan, *, bias: bool, identity: frozenset[Span] = frozenset(),
                     map_kind: str | Mapping[Span, str] = "linear") -> ParameterReport:
    """Exact parameter counts, plus the paper's Table-1 convention for comparison.

    The paper counts, per replaced block, that block's parameters minus one d×d+d map; the true
    count subtracts one map per span (none for an identity span or a folded map, d×d without bias).
    `map_kind`: the plan's kind, or each span's (a ``map: auto`` run's choices).
    """
    adapter = ViTAdapter(model)
    d = adapter.embed_dim
    rows = []
    for span in plan.spans:
        block_params = sum(adapter.block_parameter_count(i) for i in span.removed)
        kind = map_kind if isinstance(map_kind, str) else map_kind[span]
        map_params = 0 if span in identity or kind in ("folded", "identity") else d * d + (d if bias else 0)
        paper = sum(adapter.block_parameter_count(i) - (d * d + d) for i in span.removed)
        rows.append(SpanParameters(str(span), len(span.removed), block_params, map_params, block_params - map_params, paper))
    original = count_parameters(model)
    removed = sum(r.removed for r in rows)
    return ParameterReport(original, original - removed, removed, sum(r.paper_removed for r in rows), tuple(rows))
