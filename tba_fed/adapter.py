"""A thin view of a timm vision transformer as a sequence of residual blocks.

TBA only needs three things from a model: its embedding (patches, prefix tokens, position
embedding), its block sequence, and its final norm and head. timm's ``VisionTransformer`` family
(``vit_*``, ``deit_*`` incl. distilled, ``vit_*_dinov2`` with layer-scale and register tokens)
shares that structure, so the adapter works through timm's own submodules instead of copying
their ``forward``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from timm.models.vision_transformer import Block, LayerScale, VisionTransformer
from torch import nn

from .errors import TBAInputError

if TYPE_CHECKING:
    from .plan import Span

TOKEN_MODES: tuple[str, ...] = ("all", "cls", "patch")
# What a span's map is fitted on (its (input, target) pair): `linear` maps x_s to x_e and replaces blocks s+1..e;
# `folded` maps block s's MLP branch m_s to x_e − h_s and is folded into block s's fc2 (zero added parameters).
MAP_KINDS: tuple[str, ...] = ("linear", "folded")
# `auto` collects both kinds' statistics in one pass and picks per span the kind with the lower held-out error.
MAP_CHOICES: tuple[str, ...] = (*MAP_KINDS, "auto")


class ViTAdapter:
    """Runs embedding -> blocks[i:j] -> norm/head of a timm ViT and captures block outputs."""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, VisionTransformer):
            raise TBAInputError(
                "model",
                f"{type(model).__name__} is not a timm VisionTransformer",
                "use a timm ViT family model such as vit_*, deit_* or vit_*_dinov2",
            )
        if not isinstance(model.blocks, nn.Sequential) or len(model.blocks) == 0:
            raise TBAInputError("model", "the model has no nn.Sequential of blocks")
        self.model = model

    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def num_prefix_tokens(self) -> int:
        """Class, distillation and register tokens that precede the patch tokens."""
        return int(self.model.num_prefix_tokens)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The input of block 0, exactly as timm's ``forward_features`` computes it."""
        m = self.model
        x = m.patch_embed(images)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def iter_block_outputs(self, images: torch.Tensor, last: int) -> Iterator[torch.Tensor]:
        """Yield the outputs of blocks 0..last and stop: later blocks are never run."""
        if not 0 <= last < self.num_blocks:
            raise TBAInputError("block", f"block {last} is out of range 0..{self.num_blocks - 1}")
        x = self.embed(images)
        for block in self.model.blocks[: last + 1]:
            x = block(x)
            yield x

    def block_halves(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `index` run in two halves, (h, m), with block(x) == h + m exactly as timm's ``Block.forward``:
        h = x + drop_path1(ls1(attn(norm1(x)))), m = drop_path2(ls2(mlp(norm2(h)))). A folded map is fitted on m."""
        block = self.foldable_block(index)
        h = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        return h, block.drop_path2(block.ls2(block.mlp(block.norm2(h))))

    def foldable_block(self, index: int) -> Block:
        """Block `index`, if a map can be folded into it: a pre-norm timm ``Block`` whose MLP ends in a Linear fc2
        and whose second LayerScale is timm's or absent (other block types compute their branches differently)."""
        block = self.model.blocks[index]
        fix = "use map: linear for this model"
        if type(block) is not Block:
            raise TBAInputError("map", f"block {index} is a {type(block).__name__}, not timm's pre-norm Block", fix)
        if not isinstance(getattr(block.mlp, "fc2", None), nn.Linear):
            raise TBAInputError("map", f"block {index}'s MLP has no Linear fc2 to fold a map into", fix)
        if not isinstance(block.ls2, (LayerScale, nn.Identity)):
            raise TBAInputError("map", f"block {index}'s ls2 is a {type(block.ls2).__name__}", fix)
        return block

    def span_pairs(self, images: torch.Tensor, spans: Sequence[Span], kind: str,
                   token_mode: str) -> dict[Span, tuple[torch.Tensor, torch.Tensor]]:
        """Each span's (input, target) pair, the selected tokens per image [images, tokens, dim]:
        ``linear`` (x_s, x_e), ``folded`` (m_s, x_e − h_s). The one place both kinds are defined: every pass that
        sums span statistics (exact, clipped, public bounds and priors) gets its pairs here. The forward stops
        after the last block a span reads."""
        check_map_kind(kind)
        return self.kind_span_pairs(images, spans, (kind,), token_mode)[kind]

    def kind_span_pairs(self, images: torch.Tensor, spans: Sequence[Span], kinds: Sequence[str],
                        token_mode: str) -> dict[str, dict[Span, tuple[torch.Tensor, torch.Tensor]]]:
        """`span_pairs` of several kinds from one forward: block s run in halves gives h_s + m_s, bit for bit
        the block's output, so ``map: auto`` collects the linear and the folded pairs at the cost of one pass."""
        for kind in kinds:
            check_map_kind(kind)
        self.check_token_mode(token_mode)
        starts, ends = {s.start for s in spans}, {s.end for s in spans}
        halves: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        outputs: dict[int, torch.Tensor] = {}
        x = self.embed(images)
        for index in range(max(ends) + 1):
            if "folded" in kinds and index in starts:
                halves[index] = self.block_halves(index, x)
                x = halves[index][0] + halves[index][1]
            else:
                x = self.model.blocks[index](x)
            if index in starts | ends:
                outputs[index] = x
        pairs: dict[str, dict[Span, tuple[torch.Tensor, torch.Tensor]]] = {kind: {} for kind in kinds}
        for span in spans:
            for kind in kinds:
                if kind == "linear":
                    x_in, y = outputs[span.start], outputs[span.end]
                else:
                    h, m = halves[span.start]
                    x_in, y = m, outputs[span.end] - h
                pairs[kind][span] = (self.image_tokens(x_in, token_mode), self.image_tokens(y, token_mode))
        return pairs

    def run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for block in self.model.blocks[start:stop]:
            x = block(x)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm then timm's head (pooling, fc_norm, classifier)."""
        return self.model.forward_head(self.model.norm(x))

    def tokens_per_image(self, mode: str) -> int:
        """Rows one image contributes in a token mode: public, it scales the sensitivities."""
        self.check_token_mode(mode)
        patches = int(self.model.patch_embed.num_patches)
        return {"all": patches + self.num_prefix_tokens, "cls": 1, "patch": patches}[mode]

    def image_tokens(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """The selected tokens kept per image, [images, tokens, dim]: the privacy unit is one image."""
        return self.select_tokens(x, mode).reshape(x.shape[0], -1, x.shape[-1])

    def select_tokens(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """Rows that enter the statistics: [batch, tokens, dim] -> [rows, dim].

        ``all`` keeps every token (the paper's default), ``cls`` the class token only, ``patch``
        the patch tokens only (no class, distillation or register tokens).
        """
        self.check_token_mode(mode)
        rows = {"all": x, "cls": x[:, :1], "patch": x[:, self.num_prefix_tokens :]}[mode]
        return rows.reshape(-1, x.shape[-1])

    def check_token_mode(self, mode: str) -> None:
        if mode not in TOKEN_MODES:
            raise TBAInputError("token_mode", f"unknown token mode {mode!r}", f"use one of {', '.join(TOKEN_MODES)}")
        if mode == "cls" and self.model.cls_token is None:
            raise TBAInputError("token_mode", "cls needs a model with a class token", "use all or patch")

    def block_parameter_count(self, index: int) -> int:
        return sum(p.numel() for p in self.model.blocks[index].parameters())


def check_map_kind(kind: str) -> None:
    if kind not in MAP_KINDS:
        raise TBAInputError("map", f"unknown map kind {kind!r}", f"use one of {', '.join(MAP_KINDS)}")


def collected_kinds(choice: str) -> tuple[str, ...]:
    """The kinds whose statistics a run's ``map`` setting collects: itself, or both for ``auto``."""
    if choice == "auto":
        return MAP_KINDS
    check_map_kind(choice)
    return (choice,)
