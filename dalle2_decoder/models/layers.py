"""Convolutional building blocks of the U-Net: embeddings, norms, ResNet blocks, resampling.

Module and parameter names (`project`, `time_mlp`, `res_conv`, `g`, ...) and parameter shapes
follow DALLE2-pytorch 1.15.6, so that its state dicts load without renaming (see
`reference_names.py`). Arithmetic that affects results beyond float rounding (the order in
which the sinusoidal frequencies are formed, the LayerNorm epsilon per dtype) is the reference's too.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttention


class SinusoidalPosEmb(nn.Module):
    """Transformer sinusoidal embedding of a (possibly fractional) timestep (Vaswani et al. sec. 3.5).

    Computed in the dtype of its (float) input; frequencies exp(-i * ln(10000) / (half - 1)),
    formed in that order because at t ~ 1000 a one-ulp difference in a frequency moves sin(t * f)
    by ~1e-4.
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"sinusoidal embedding dim must be even and at least 4, got {dim}")
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            raise TypeError(f"sinusoidal embedding expects float timesteps, got {t.dtype}")
        half = self.dim // 2
        step = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=t.dtype) * -step)
        args = t[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


def _norm_eps(x: torch.Tensor) -> float:
    # Half precision cannot resolve 1e-5 next to typical variances; the reference switches to 1e-3.
    return 1e-5 if x.dtype == torch.float32 else 1e-3


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with a gain and no bias.

    `divide_by_max` (DALLE2-pytorch 0.16.5 to 0.23.2, see `releases`): the input is first divided
    by its (detached) maximum, which changes the result through eps and flips it where that maximum
    is negative.
    """

    divide_by_max = False

    def __init__(self, dim: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.divide_by_max:
            x = x / x.amax(dim=-1, keepdim=True).detach()
        var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
        return (x - mean) * (var + _norm_eps(x)).rsqrt() * self.g


class ChanLayerNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, with a gain and no bias (`divide_by_max`: as LayerNorm)."""

    divide_by_max = False

    def __init__(self, dim: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.divide_by_max:
            x = x / x.amax(dim=1, keepdim=True).detach()
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * (var + _norm_eps(x)).rsqrt() * self.g


class WeightStandardizedConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel (Qiao et al. 2019), pairs well with GroupNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        var, mean = torch.var_mean(w.flatten(1), dim=1, unbiased=False)
        w = (w - mean[:, None, None, None]) * (var + _norm_eps(x)).rsqrt()[:, None, None, None]
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Block(nn.Module):
    """conv3x3 -> GroupNorm -> optional FiLM (scale, shift) -> SiLU."""

    def __init__(self, dim_in: int, dim_out: int, groups: int = 8, weight_standardization: bool = False):
        super().__init__()
        conv = WeightStandardizedConv2d if weight_standardization else nn.Conv2d
        self.project = conv(dim_in, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)

    def forward(self, x: torch.Tensor, scale_shift: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        x = self.norm(self.project(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return F.silu(x)


class ResnetBlock(nn.Module):
    """Two conv blocks, the first FiLM-modulated by the time vector, optionally cross-attending in between.

    The cross-attention sits between the two convolutions so that the conditioning tokens shape the
    features the second convolution mixes spatially.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        *,
        time_cond_dim: int,
        cond_dim: Optional[int] = None,
        groups: int = 8,
        weight_standardization: bool = False,
        cosine_sim_cross_attn: bool = False,
        cross_attn_heads: int = 8,
        cross_attn_dim_head: int = 64,
    ):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_cond_dim, dim_out * 2))
        self.cross_attn = (
            CrossAttention(
                dim_out,
                context_dim=cond_dim,
                heads=cross_attn_heads,
                dim_head=cross_attn_dim_head,
                cosine_sim=cosine_sim_cross_attn,
            )
            if cond_dim is not None
            else None
        )
        self.block1 = Block(dim_in, dim_out, groups, weight_standardization)
        self.block2 = Block(dim_out, dim_out, groups, weight_standardization)
        self.res_conv = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, time_cond: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        scale, shift = self.time_mlp(time_cond)[:, :, None, None].chunk(2, dim=1)
        h = self.block1(x, (scale, shift))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("ResnetBlock: this block cross-attends and needs context tokens")
            b, c, height, width = h.shape
            tokens = h.flatten(2).transpose(1, 2)  # (B, HW, C), any memory format
            tokens = tokens + self.cross_attn(tokens, context)
            h = tokens.transpose(1, 2).reshape(b, c, height, width)
        h = self.block2(h)
        return h + self.res_conv(x)


class CrossEmbedLayer(nn.Module):
    """Convolutions of several kernel sizes whose outputs are concatenated (CrossFormer's cross-scale embedding).

    Smaller kernels get more channels: kernel i of n (sorted) gets int(dim_out / 2^(i+1)), the largest the rest.
    """

    def __init__(self, dim_in: int, dim_out: int, kernel_sizes: Sequence[int], stride: int = 2):
        super().__init__()
        kernel_sizes = sorted(kernel_sizes)
        if not kernel_sizes or not all((k % 2) == (stride % 2) for k in kernel_sizes):
            raise ValueError(f"cross-embed kernel sizes {kernel_sizes} must all have the parity of stride {stride}")
        splits = [int(dim_out / 2 ** (i + 1)) for i in range(len(kernel_sizes) - 1)]
        splits.append(dim_out - sum(splits))
        self.convs = nn.ModuleList(
            nn.Conv2d(dim_in, c, k, stride=stride, padding=(k - stride) // 2) for k, c in zip(kernel_sizes, splits)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(x) for conv in self.convs], dim=1)


def Downsample(dim_in: int, dim_out: int) -> nn.Sequential:
    """Halve the resolution without discarding pixels: space-to-depth (SP-conv), then a 1x1 conv."""
    return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(dim_in * 4, dim_out, 1))


def StridedConvDownsample(dim_in: int, dim_out: int) -> nn.Conv2d:
    """Halve the resolution with a 4x4 stride-2 convolution (DALLE2-pytorch before 1.10)."""
    return nn.Conv2d(dim_in, dim_out, 4, 2, 1)


def ConvTransposeUpsample(dim_in: int, dim_out: int) -> nn.ConvTranspose2d:
    """Double the resolution with a 4x4 stride-2 transposed convolution (DALLE2-pytorch before 0.21)."""
    return nn.ConvTranspose2d(dim_in, dim_out, 4, 2, 1)


def NearestUpsample(dim_in: int, dim_out: int) -> nn.Sequential:
    """Double the resolution with nearest-neighbour interpolation, then a 3x3 conv."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim_in, dim_out, 3, padding=1))


class PixelShuffleUpsample(nn.Module):
    """Double the resolution with a 1x1 conv to 4x channels, SiLU and depth-to-space.

    The conv is initialised so that the four sub-pixels start identical (ICNR, Aitken et al. 2017),
    which avoids the checkerboard artefacts of a random depth-to-space at init.
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        conv = nn.Conv2d(dim_in, dim_out * 4, 1)
        base = torch.empty(dim_out, dim_in, 1, 1, device=conv.weight.device)
        nn.init.kaiming_uniform_(base)
        with torch.no_grad():
            conv.weight.copy_(base.repeat_interleave(4, dim=0))
            conv.bias.zero_()
        self.net = nn.Sequential(conv, nn.SiLU(), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ------------------------------------------------------------------------ resizing
def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys cubic convolution kernel (a = -0.5), support [-2, 2]."""
    a = x.abs()
    near = (1.5 * a**3 - 2.5 * a**2 + 1.0) * (a <= 1)
    far = (-0.5 * a**3 + 2.5 * a**2 - 4.0 * a + 2.0) * ((a > 1) & (a <= 2))
    return near + far


@lru_cache(maxsize=64)
def _resize_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) weights of a cubic, antialiased (when shrinking) resize with zero padding.

    Pixel centres are aligned (sample i of the output sits at (i + 0.5) / scale - 0.5 of the
    input); each output's taps are normalised to sum to one before the taps that fall outside the
    image are dropped, which is what zero padding amounts to. This is the resampling of the
    `resize-right` package that DALLE2-pytorch uses for its resizes.
    """
    scale = out_size / in_size
    eps = torch.finfo(torch.float32).eps
    support = 4.0 if scale >= 1 else 4.0 / scale
    centres = torch.arange(out_size, dtype=torch.float64) / scale + (in_size - 1) / 2 - (out_size - 1) / (2 * scale)
    left = torch.ceil(centres - support / 2 - eps).long()
    taps = left[:, None] + torch.arange(math.ceil(support - eps))[None, :]
    dist = centres[:, None] - taps
    weights = _cubic(dist) if scale >= 1 else scale * _cubic(scale * dist)
    total = weights.sum(dim=1, keepdim=True)
    weights = weights / torch.where(total == 0, torch.ones_like(total), total)
    inside = (taps >= 0) & (taps < in_size)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)[:, None].expand_as(taps)
    matrix.index_put_((rows[inside], taps[inside]), weights[inside], accumulate=True)
    return matrix


def resize_cubic(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the last two (square) dims of x to size x size like DALLE2-pytorch's `resize_image_to`.

    Separable cubic interpolation, antialiased when shrinking, zero padding at the borders; the
    output of a scale factor s has ceil(s * in) pixels, as in the reference.
    """
    in_size = x.shape[-1]
    if in_size == size:
        return x
    out_size = math.ceil(size / in_size * in_size)
    rows = _resize_matrix(x.shape[-2], math.ceil(size / in_size * x.shape[-2])).to(x.device, x.dtype)
    cols = _resize_matrix(in_size, out_size).to(x.device, x.dtype)
    return torch.einsum("oh,...hw,pw->...op", rows, x, cols)


class UpsampleCombiner(nn.Module):
    """Resize every up level's feature map to the output size and append a conv block of each (U-Net squared)."""

    def __init__(self, dim: int, *, enabled: bool = False, dim_ins: Sequence[int] = (), dim_outs: Sequence[int] = ()):
        super().__init__()
        if len(dim_ins) != len(dim_outs):
            raise ValueError("UpsampleCombiner: dim_ins and dim_outs differ in length")
        self.enabled = enabled
        self.dim_out = dim + (sum(dim_outs) if enabled else 0)
        if enabled:
            self.fmap_convs = nn.ModuleList(Block(i, o) for i, o in zip(dim_ins, dim_outs))

    def forward(self, x: torch.Tensor, fmaps: List[torch.Tensor]) -> torch.Tensor:
        if not self.enabled or not fmaps or len(self.fmap_convs) == 0:
            return x
        size = x.shape[-1]
        outs = [conv(resize_cubic(fmap, size)) for fmap, conv in zip(fmaps, self.fmap_convs)]
        return torch.cat((x, *outs), dim=1)
