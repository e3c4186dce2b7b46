"""The levels of a U-Net: how its blocks are built from its settings, and how far it downsamples.

`LevelBuilder` holds the options every block of one kind shares (ResNet blocks, self-attention,
down- and upsampling), so that `Unet.__init__` reads as the layout of its levels. The blocks are
created in the order the reference creates them: parameter initialisation draws from the random
generator in that order, and the module tree (so the state dict's names) is the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, LinearAttention, Residual, ToSequence
from .layers import (
    ConvTransposeUpsample,
    CrossEmbedLayer,
    Downsample,
    NearestUpsample,
    PixelShuffleUpsample,
    ResnetBlock,
    StridedConvDownsample,
)
from .releases import UnetDifferences


def per_level(value: Any, levels: int, name: str) -> list:
    """One value for every resolution level, or a list with exactly one per level."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"Unet: {name} has {len(value)} entries but dim_mults has {levels} levels")
        return list(value)
    return [value] * levels


def downsample_factor(levels: int, memory_efficient: bool) -> int:
    """How many times smaller the bottleneck is than the input: every level but the last halves the
    resolution (memory_efficient: every level)."""
    return 2 ** (levels if memory_efficient else max(levels - 1, 0))


def image_size_problems(
    path: str, size: int, dim_mults: Sequence[int], memory_efficient: bool, unet: str = "this U-Net"
) -> List[str]:
    """An image side the U-Net can halve at every downsampling and double back to the same size."""
    factor = downsample_factor(len(dim_mults), memory_efficient)
    if size % factor == 0:
        return []
    return [
        f"{path}: {size} is not divisible by {factor}, the total downsampling of {unet} (dim_mults "
        f"{list(dim_mults)}{', memory_efficient' if memory_efficient else ''}); use e.g. "
        f"{size - size % factor or factor} or {size + factor - size % factor}"
    ]


def block_runner(checkpointed: bool) -> Callable[..., torch.Tensor]:
    """How the U-Net calls its blocks: directly, or with gradient checkpointing (activations recomputed
    in the backward pass instead of kept)."""
    if checkpointed:

        def run(module: nn.Module, *args: Any) -> torch.Tensor:
            return checkpoint(module, *args, use_reentrant=False)

        return run
    return lambda module, *args: module(*args)


@dataclass(frozen=True)
class LevelBuilder:
    """Builds the blocks of a U-Net's levels; each field is the `Unet` option of the same meaning."""

    time_cond_dim: int
    cond_dim: int
    self_attn: Sequence[bool]
    """Full self-attention per level."""
    num_resnet_blocks: Sequence[int]
    """ResNet blocks per level after the level's first one."""
    resnet_groups: Sequence[int]
    """GroupNorm groups per level."""
    attn_heads: int
    attn_dim_head: int
    sparse_attn: bool
    cosine_sim_self_attn: bool
    cosine_sim_cross_attn: bool
    cross_attn_heads: int
    cross_attn_dim_head: int
    resnet_weight_standardization: bool
    cross_embed_downsample: bool
    cross_embed_downsample_kernel_sizes: Sequence[int]
    pixel_shuffle_upsample: bool
    memory_efficient: bool
    release: UnetDifferences

    @classmethod
    def for_unet(
        cls, options: Dict[str, Any], *, time_cond_dim: int, cond_dim: int, release: UnetDifferences
    ) -> "LevelBuilder":
        """The builder of a U-Net with these constructor options (`Unet.config`)."""
        levels = len(options["dim_mults"])
        self_attn = [bool(a) for a in per_level(options["self_attn"], levels, "self_attn")]
        num_resnet_blocks = per_level(options["num_resnet_blocks"], levels, "num_resnet_blocks")
        resnet_groups = per_level(options["resnet_groups"], levels, "resnet_groups")
        derived = {"time_cond_dim", "cond_dim", "release", "self_attn", "num_resnet_blocks", "resnet_groups"}
        return cls(
            time_cond_dim=time_cond_dim,
            cond_dim=cond_dim,
            self_attn=self_attn,
            num_resnet_blocks=num_resnet_blocks,
            resnet_groups=resnet_groups,
            release=release,
            **{field.name: options[field.name] for field in fields(cls) if field.name not in derived},
        )

    def resnet(self, d_in: int, d_out: int, groups: int, context_dim: Optional[int] = None) -> ResnetBlock:
        """A ResNet block; given a `context_dim`, it cross-attends to the context tokens."""
        cross_attention = {
            "cosine_sim_cross_attn": self.cosine_sim_cross_attn,
            "cross_attn_heads": self.cross_attn_heads,
            "cross_attn_dim_head": self.cross_attn_dim_head,
        }
        return ResnetBlock(
            d_in,
            d_out,
            time_cond_dim=self.time_cond_dim,
            cond_dim=context_dim,
            groups=groups,
            weight_standardization=self.resnet_weight_standardization,
            **cross_attention,
        )

    def self_attention(self, d: int) -> nn.Module:
        attention = Attention(
            d,
            heads=self.attn_heads,
            dim_head=self.attn_dim_head,
            cosine_sim=self.cosine_sim_self_attn,
            sqrt_scale=self.release.self_attn_sqrt_scale,
        )
        return ToSequence(Residual(attention))

    def level_attention(self, d: int, level: int) -> nn.Module:
        if self.self_attn[level]:
            return self.self_attention(d)
        if self.sparse_attn:
            return Residual(
                LinearAttention(
                    d,
                    heads=self.attn_heads,
                    dim_head=self.attn_dim_head,
                    unnormalised_values=self.release.unnormalised_linear_attention,
                )
            )
        return nn.Identity()

    def downsample(self, d_in: int, d_out: int) -> nn.Module:
        if self.cross_embed_downsample:
            return CrossEmbedLayer(d_in, d_out, self.cross_embed_downsample_kernel_sizes, stride=2)
        return StridedConvDownsample(d_in, d_out) if self.release.strided_conv_downsample else Downsample(d_in, d_out)

    def upsample(self, d_in: int, d_out: int) -> nn.Module:
        if self.release.conv_transpose_upsample:
            return ConvTransposeUpsample(d_in, d_out)
        return PixelShuffleUpsample(d_in, d_out) if self.pixel_shuffle_upsample else NearestUpsample(d_in, d_out)

    def width(self, d_in: int, d_out: int) -> int:
        """Channels the blocks of a down level work at (and so the width of its skip connections)."""
        return d_out if self.memory_efficient else d_in

    def down_level(self, level: int, d_in: int, d_out: int, is_last: bool) -> nn.ModuleList:
        """[pre-downsample, first block, blocks, attention, post-downsample] of down level `level`."""
        work = self.width(d_in, d_out)
        groups = self.resnet_groups[level]
        # The top resolution skips cross-attention: it would cost the most, and the
        # conditioning reaches it through the FiLM time/image vector anyway.
        context_dim = self.cond_dim if level > 0 else None
        post = self.downsample(work, d_out) if not (is_last or self.memory_efficient) else nn.Conv2d(work, d_out, 1)
        blocks = self.num_resnet_blocks[level]
        return nn.ModuleList(
            [
                self.downsample(d_in, d_out) if self.memory_efficient else None,
                self.resnet(work, work, groups),
                nn.ModuleList(self.resnet(work, work, groups, context_dim) for _ in range(blocks)),
                self.level_attention(work, level),
                post,
            ]
        )

    def up_level(self, level: int, d_in: int, d_out: int, skip: int) -> nn.ModuleList:
        """[first block, blocks, attention, upsample] of the up level at resolution `level`."""
        groups = self.resnet_groups[level]
        context_dim = self.cond_dim if level > 0 else None
        blocks = self.num_resnet_blocks[level]
        return nn.ModuleList(
            [
                self.resnet(d_out + skip, d_out, groups, context_dim),
                nn.ModuleList(self.resnet(d_out + skip, d_out, groups, context_dim) for _ in range(blocks)),
                self.level_attention(d_out, level),
                self.upsample(d_out, d_in) if (level > 0 or self.memory_efficient) else nn.Identity(),
            ]
        )
