"""Attention layers of the U-Net, computed with scaled_dot_product_attention.

The functions are those of DALLE2-pytorch 1.15.6 (and so are parameter names and shapes, so its
weights load): every attention has a learned null key/value pair prepended to its keys (so that
a query can attend to "nothing"), a gain-only LayerNorm before, and a linear + LayerNorm after.
SDPA receives the explicit softmax scale the reference's arithmetic amounts to (see the classes),
which lets it pick a fused kernel (flash / memory-efficient) on GPU; no attention mask is ever
needed because dropped or padded text is replaced by learned null tokens before attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Fixed inverse temperature for cosine-similarity attention (q and k are l2-normalised, so the
# usual 1/sqrt(d) would make the softmax almost uniform).
COSINE_SIM_SCALE = 16.0


def _layer_norm(dim: int) -> nn.Module:
    # Imported here: layers.py imports this module for CrossAttention.
    from .layers import LayerNorm

    return LayerNorm(dim)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cosine_sim: bool) -> torch.Tensor:
    """softmax(scale * q k^T) v over (B, heads, N, d) queries and (B, heads or 1, M, d) keys/values.

    cosine_sim l2-normalises q and k first. One key/value head is shared by all query heads
    (grouped-query SDPA, so the shared head is never materialised per query head).
    """
    if cosine_sim:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    shared = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=shared)


class Residual(nn.Module):
    """x + fn(x)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)


class ToSequence(nn.Module):
    """Apply a token module to a (B, C, H, W) map as a (B, HW, C) sequence (any memory format)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        out = self.fn(x.flatten(2).transpose(1, 2))
        return out.transpose(1, 2).reshape(b, c, h, w)


class Attention(nn.Module):
    """Multi-query self-attention over tokens (B, N, dim): `heads` query heads share one key/value head.

    Softmax scale: 16 with cosine_sim, else 1 / dim_head. (The reference scales q by dim_head^-0.5
    twice; this is that function, kept so that its trained weights behave as trained.) `sqrt_scale`:
    dim_head^-0.5 instead, as DALLE2-pytorch before 1.4.3 (see `releases`).
    """

    def __init__(
        self, dim: int, *, heads: int = 8, dim_head: int = 64, cosine_sim: bool = False, sqrt_scale: bool = False
    ):
        super().__init__()
        self.heads = heads
        self.cosine_sim = cosine_sim
        self.scale = COSINE_SIM_SCALE if cosine_sim else (dim_head**-0.5 if sqrt_scale else 1.0 / dim_head)
        self.norm = _layer_norm(dim)
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False), _layer_norm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).reshape(b, n, self.heads, -1).transpose(1, 2)  # (B, h, N, d)
        k, v = self.to_kv(x).chunk(2, dim=-1)  # (B, N, d) each
        null_k, null_v = self.null_kv.to(x.dtype).unbind(0)
        k = torch.cat((null_k.expand(b, 1, -1), k), dim=1)[:, None]  # (B, 1, 1 + N, d): one head for all
        v = torch.cat((null_v.expand(b, 1, -1), v), dim=1)[:, None]
        out = _attend(q, k, v, self.scale, self.cosine_sim)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class CrossAttention(nn.Module):
    """Multi-head attention of tokens (B, N, dim) over context tokens (B, M, context_dim).

    Softmax scale: 16 with cosine_sim, else dim_head^-0.5. The null key/value (one pair, shared by
    all heads) is prepended to the context.
    """

    def __init__(self, dim: int, *, context_dim: int, heads: int = 8, dim_head: int = 64, cosine_sim: bool = False):
        super().__init__()
        self.heads = heads
        self.cosine_sim = cosine_sim
        self.scale = COSINE_SIM_SCALE if cosine_sim else dim_head**-0.5
        self.norm = _layer_norm(dim)
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(context_dim, heads * dim_head * 2, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False), _layer_norm(dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = context.shape[1]
        x = self.norm(x)
        q = self.to_q(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        k, v = (t.reshape(b, m, self.heads, -1).transpose(1, 2) for t in self.to_kv(context).chunk(2, dim=-1))
        null_k, null_v = (t.to(x.dtype).expand(b, self.heads, 1, -1) for t in self.null_kv.unbind(0))
        out = _attend(q, torch.cat((null_k, k), dim=2), torch.cat((null_v, v), dim=2), self.scale, self.cosine_sim)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class LinearAttention(nn.Module):
    """Linear attention over a (B, C, H, W) map (softmax over features for q, over positions for k): O(HW).

    Used by `sparse_attn` at levels without full self-attention. v is l2-normalised and k, v are
    divided by sqrt(HW) before the (d x d) context is formed, which keeps its scale independent of
    the resolution; GELU after aggregation. `unnormalised_values`: neither (DALLE2-pytorch before 1.4.0).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int = 32, unnormalised_values: bool = False):
        super().__init__()
        from .layers import ChanLayerNorm

        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.unnormalised_values = unnormalised_values
        self.norm = ChanLayerNorm(dim)
        self.to_qkv = nn.Conv2d(dim, inner * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(inner, dim, 1, bias=False), ChanLayerNorm(dim))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        b, _, h, w = fmap.shape
        n = h * w
        qkv = self.to_qkv(self.norm(fmap)).reshape(b, 3, self.heads, -1, n)  # (B, 3, heads, d, HW)
        q, k, v = qkv.unbind(1)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        if not self.unnormalised_values:
            k, v = k / math.sqrt(n), F.normalize(v, dim=-2) / math.sqrt(n)
        context = torch.einsum("bhdn,bhen->bhde", k, v)  # a (d x d) summary of all positions
        out = torch.einsum("bhdn,bhde->bhen", q, context)
        return self.to_out(F.gelu(out.reshape(b, -1, h, w)))
