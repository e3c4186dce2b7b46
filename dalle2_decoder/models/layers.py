"""Convolutional building blocks of the U-Net: embeddings, ResNet blocks, resampling."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttention2d


class SinusoidalPosEmb(nn.Module):
    """Transformer sinusoidal embedding of a (possibly fractional) timestep (Vaswani et al. sec. 3.5)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"sinusoidal embedding dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Always fp32: bf16 cannot represent t * freq for t in the hundreds precisely enough.
        args = t.float()[:, None] * self.freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class WeightStandardizedConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel (Qiao et al. 2019), pairs well with GroupNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) * (var + eps).rsqrt(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class ConvBlock(nn.Module):
    """conv3x3 -> GroupNorm -> optional FiLM (scale, shift) -> SiLU."""

    def __init__(self, dim_in: int, dim_out: int, groups: int, weight_standardization: bool = False):
        super().__init__()
        conv = WeightStandardizedConv2d if weight_standardization else nn.Conv2d
        self.conv = conv(dim_in, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)

    def forward(self, x: torch.Tensor, scale_shift: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        x = self.norm(self.conv(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return F.silu(x)


class ResnetBlock(nn.Module):
    """Two conv blocks, FiLM-conditioned on the time/image vector, optionally cross-attending in between.

    The cross-attention sits between the two convolutions (as in the reference design) so that the
    conditioning tokens shape the features the second convolution mixes spatially.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        *,
        time_cond_dim: int,
        groups: int = 8,
        cond_dim: Optional[int] = None,
        attn_heads: int = 8,
        attn_dim_head: int = 64,
        cosine_sim_cross_attn: bool = False,
        weight_standardization: bool = False,
    ):
        super().__init__()
        self.to_scale_shift = nn.Sequential(nn.SiLU(), nn.Linear(time_cond_dim, dim_out * 2))
        self.block1 = ConvBlock(dim_in, dim_out, groups, weight_standardization)
        self.cross_attn = (
            CrossAttention2d(dim_out, context_dim=cond_dim, heads=attn_heads, dim_head=attn_dim_head, cosine_sim=cosine_sim_cross_attn)
            if cond_dim is not None
            else None
        )
        self.block2 = ConvBlock(dim_out, dim_out, groups, weight_standardization)
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, time_cond: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        scale, shift = self.to_scale_shift(time_cond)[:, :, None, None].chunk(2, dim=1)
        h = self.block1(x, (scale, shift))
        if self.cross_attn is not None and context is not None:
            h = self.cross_attn(h, context)
        h = self.block2(h)
        return h + self.skip(x)


class CrossEmbed(nn.Module):
    """Convolutions of several kernel sizes whose outputs are concatenated (CrossFormer's cross-scale embedding).

    Smaller kernels get more channels: kernel i of n gets dim_out / 2^(i+1), the largest the rest.
    """

    def __init__(self, dim_in: int, dim_out: int, kernel_sizes: Sequence[int], stride: int = 1):
        super().__init__()
        kernel_sizes = sorted(kernel_sizes)
        if not all((k % 2) == (stride % 2) for k in kernel_sizes):
            raise ValueError(f"cross-embed kernel sizes {kernel_sizes} must all have the parity of stride {stride}")
        n = len(kernel_sizes)
        splits = [dim_out // 2 ** (i + 1) for i in range(n - 1)]
        splits.append(dim_out - sum(splits))
        self.convs = nn.ModuleList(
            nn.Conv2d(dim_in, c, k, stride=stride, padding=(k - stride) // 2) for k, c in zip(kernel_sizes, splits)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(x) for conv in self.convs], dim=1)


class Downsample(nn.Module):
    """Halve the resolution without discarding pixels: space-to-depth, then a 1x1 conv."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Conv2d(dim_in * 4, dim_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.pixel_unshuffle(x, 2))


class PixelShuffleUpsample(nn.Module):
    """Double the resolution with a 1x1 conv to 4x channels and depth-to-space.

    The conv is initialised so that the four sub-pixels start identical (ICNR, Aitken et al. 2017),
    which avoids the checkerboard artefacts of a random depth-to-space at init.
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out * 4, 1)
        base = torch.empty(dim_out, dim_in, 1, 1)
        nn.init.kaiming_uniform_(base, a=math.sqrt(5))
        with torch.no_grad():
            self.conv.weight.copy_(base.repeat_interleave(4, dim=0))
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(F.silu(self.conv(x)), 2)


class NearestUpsample(nn.Module):
    """Double the resolution with nearest-neighbour interpolation, then a 3x3 conv."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
