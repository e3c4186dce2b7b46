"""Decoder fidelity: how close images generated from embeddings come to what the embeddings encode.

A decoder inverts an image embedding, so two per-sample measures say how well it does:

- `clip_similarity`: the cosine between CLIP's embedding of a generated image and the embedding it
  was generated from (1 when CLIP sees in the sample exactly what it saw in the true image);
- `paired_errors`: the RMSE between a generated image and the true image its embedding came
  from, at full scale and after both are area-averaged to a few pixels a side (colour and layout,
  not texture).

Plain tensor functions returning one value per sample, so that pooling over batches and ranks is
a sum and a count (`metrics.FidelityScores`). See docs/EVALUATION.md for what each does and does not tell.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common.images import resize

if TYPE_CHECKING:
    from ..clip import ClipEmbedder

PAIRED_KEYS = ("paired_rmse", "paired_rmse_coarse")


def _rmse(a: Tensor, b: Tensor) -> Tensor:
    """Root of the mean squared difference over channels and pixels: (B, C, H, W) -> (B,)."""
    return (a - b).square().mean(dim=(1, 2, 3)).sqrt()


def paired_errors(samples: Tensor, targets: Tensor, coarse_size: int = 8) -> Dict[str, Tensor]:
    """Per-sample RMSE between `samples` and their true images `targets`, both (B, 3, H, W) in [0, 1].

    "paired_rmse": over every pixel and channel at the samples' size. "paired_rmse_coarse": after
    both are area-averaged to `coarse_size` pixels a side (the image's size when smaller), which
    keeps colour and layout and averages texture away. Each a (B,) float64 tensor.
    """
    if samples.dim() != 4 or targets.dim() != 4 or samples.shape[:2] != targets.shape[:2]:
        raise ValueError(
            f"paired_errors: samples {tuple(samples.shape)} and targets {tuple(targets.shape)} must be "
            "(B, C, H, W) batches of the same size and channels"
        )
    if coarse_size < 1:
        raise ValueError(f"paired_errors: coarse_size must be at least 1 (got {coarse_size})")
    # In float64: each value is a mean over up to millions of squared differences, which float32 would
    # round differently with every kernel's summation order; this costs little beside sampling.
    dtype = torch.float64
    samples = samples.to(dtype)
    # The data's images may be larger than what the sampled U-Nets give (a 64px base trained on 256px
    # shards): the sample is judged at its own resolution, so the true image is brought to it with the
    # one antialiased resize every metric's real images go through.
    targets = resize(targets.to(device=samples.device, dtype=dtype), tuple(samples.shape[-2:]))
    height, width = samples.shape[-2:]
    coarse = (min(coarse_size, height), min(coarse_size, width))
    # Adaptive average pooling is area averaging: each coarse pixel is the mean of its block of pixels.
    return {
        "paired_rmse": _rmse(samples, targets),
        "paired_rmse_coarse": _rmse(F.adaptive_avg_pool2d(samples, coarse), F.adaptive_avg_pool2d(targets, coarse)),
    }


def clip_similarity(clip: "ClipEmbedder", samples: Tensor, embeddings: Tensor) -> Tensor:
    """Per-sample cosine (B,) between `clip`'s embedding of `samples` ((B, 3, H, W) in [0, 1], brought
    to CLIP's input by its own preprocessing) and `embeddings` (B, D), the image embeddings the samples
    were generated from; they need not be normalised."""
    sample_embeds = clip.embed_images(samples)
    embeddings = embeddings.to(device=sample_embeds.device, dtype=sample_embeds.dtype)
    if embeddings.shape != sample_embeds.shape:
        raise ValueError(
            f"clip_similarity: this CLIP gives {tuple(sample_embeds.shape)} embeddings for the samples but the "
            f"conditioning embeddings are {tuple(embeddings.shape)}: give the CLIP that made them"
        )
    return F.cosine_similarity(sample_embeds, embeddings, dim=-1)
