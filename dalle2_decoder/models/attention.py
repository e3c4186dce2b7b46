"""Attention layers on (B, C, H, W) feature maps, all through scaled_dot_product_attention.

Feature maps become token sequences with flatten/transpose, which works for any memory format
(channels_last included), so SDPA picks a fused kernel (flash / memory-efficient) on GPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# Fixed inverse temperature for cosine-similarity attention (q and k are l2-normalised, so the
# usual 1/sqrt(d) would make the softmax almost uniform).
COSINE_SIM_SCALE = 16.0


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)


def _to_fmap(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b, c, h, w = like.shape
    return tokens.transpose(1, 2).reshape(b, c, h, w)


class Attention(nn.Module):
    """Multi-head attention of a feature map over itself (context=None) or over context tokens.

    Pre-norm, residual handled by the caller's wrapper; the output projection is followed by a
    LayerNorm as in the reference design, which keeps the residual branch small at init.
    """

    def __init__(
        self,
        dim: int,
        *,
        context_dim: Optional[int] = None,
        heads: int = 8,
        dim_head: int = 64,
        cosine_sim: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.cosine_sim = cosine_sim
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim if context_dim is not None else dim, inner * 2, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim, bias=False), nn.LayerNorm(dim))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, -1).transpose(1, 2)  # (B, heads, N, d)

    def forward(self, tokens: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, N, dim), context (B, M, context_dim) or None -> (B, N, dim) (no residual)."""
        x = self.norm(tokens)
        q = self._split_heads(self.to_q(x))
        k, v = self.to_kv(x if context is None else context).chunk(2, dim=-1)
        k, v = self._split_heads(k), self._split_heads(v)
        scale = None
        if self.cosine_sim:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            scale = COSINE_SIM_SCALE
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class SelfAttention2d(nn.Module):
    """Residual self-attention over all positions of a feature map."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, cosine_sim: bool = False):
        super().__init__()
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, cosine_sim=cosine_sim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _to_fmap(self.attn(_to_tokens(x)), x)


class CrossAttention2d(nn.Module):
    """Residual attention of every position of a feature map over conditioning tokens."""

    def __init__(self, dim: int, *, context_dim: int, heads: int, dim_head: int, cosine_sim: bool = False):
        super().__init__()
        self.attn = Attention(dim, context_dim=context_dim, heads=heads, dim_head=dim_head, cosine_sim=cosine_sim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return x + _to_fmap(self.attn(_to_tokens(x), context), x)


class LinearAttention2d(nn.Module):
    """Residual linear attention (softmax over features, not positions): O(HW) instead of O(HW^2).

    Used as the cheap global mixing of `sparse_attn` at levels without full self-attention.
    """

    def __init__(self, dim: int, *, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm = nn.GroupNorm(1, dim)
        self.to_qkv = nn.Conv2d(dim, inner * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(inner, dim, 1, bias=False), nn.GroupNorm(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(b, 3, self.heads, -1, h * w).unbind(1)  # (B, heads, d, HW)
        q = q.softmax(dim=-2) * self.scale  # autocast runs softmax in fp32
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)  # a (d x d) summary of all positions
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return x + self.to_out(out.reshape(b, -1, h, w))
