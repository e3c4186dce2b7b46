"""What a U-Net's blocks read besides the image: the FiLM vector and the context tokens.

unCLIP (Ramesh et al. 2022, sec. 2.1): the timestep embedding, plus the projected CLIP image
embedding, is the vector every ResNet block is modulated by; the time tokens and the image
embedding projected into tokens are the context the blocks below the top resolution cross-attend
to; the bottleneck also attends to the projected text encodings. Classifier-free guidance
replaces a sample's dropped conditioning by the learned null embeddings (`keep` masks, bool (B,)).

The layers are the U-Net's own (`to_time_hiddens`, `null_image_embed`, ...): their names are the
reference's state-dict names, so these functions take the U-Net and read them there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .unet import Unet


class Reshape(nn.Module):
    """(B, n * d) -> (B, n, d); parameter-free, kept as a module so layer indices match the reference's."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.n, -1)


class Conditioning(NamedTuple):
    film: torch.Tensor
    """(B, time_cond_dim): time, low-res noise level and image embedding, added up."""
    tokens: torch.Tensor
    """(B, N, cond_dim), normalised: time and image tokens, read by the levels' cross-attention."""
    mid_tokens: torch.Tensor
    """(B, N', cond_dim), normalised: the same plus the text tokens, read at the bottleneck."""


def keep_mask(batch: int, drop_prob: float, device: torch.device) -> torch.Tensor:
    """Which samples keep their conditioning (bool (B,)); probabilities 0 and 1 draw no random numbers."""
    if drop_prob <= 0:
        return torch.ones(batch, dtype=torch.bool, device=device)
    if drop_prob >= 1:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    return torch.rand(batch, device=device) >= drop_prob


def embed(mlp: nn.Sequential, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mlp (sinusoidal embedding, then layers) of a timestep-like value, the sinusoids always in fp32.

    The reference casts the value to the activation dtype first; under bf16 autocast that rounds
    t = 987 to 988 and moves every sinusoid. In fp32 both are the same computation.
    """
    sinusoids = mlp[0](value.float())
    return mlp[1:](sinusoids.to(dtype))


def condition(
    unet: "Unet",
    time: torch.Tensor,
    dtype: torch.dtype,
    lowres_noise_level: Optional[torch.Tensor],
    image_embed: Optional[torch.Tensor],
    image_keep: torch.Tensor,
    text_encodings: Optional[torch.Tensor],
    text_mask: Optional[torch.Tensor],
    text_keep: torch.Tensor,
) -> Conditioning:
    """The FiLM vector and context tokens of one batch, in activations of `dtype`."""
    time_hiddens = embed(unet.to_time_hiddens, time, dtype)
    time_tokens = unet.to_time_tokens(time_hiddens)
    film = unet.to_time_cond(time_hiddens)
    if lowres_noise_level is not None:
        if unet.to_lowres_noise_cond is None:
            raise ValueError("Unet: lowres_noise_level given to a U-Net built without lowres_noise_cond")
        film = film + embed(unet.to_lowres_noise_cond, lowres_noise_level, dtype)

    if image_embed is not None and unet.to_image_hiddens is not None:
        image_hiddens = unet.to_image_hiddens(image_embed)
        film = film + torch.where(image_keep[:, None], image_hiddens, unet.null_image_hiddens.to(image_hiddens.dtype))

    tokens = [time_tokens]
    if unet.cond_on_image_embeds:
        if image_embed is None:
            raise ValueError("Unet: image_embed is required (this U-Net is conditioned on image embeddings)")
        image_tokens = unet.image_to_tokens(image_embed)
        if image_tokens.ndim == 2:
            # image_embed_dim == cond_dim: no projection, the embedding itself is every image token.
            # (The reference broadcasts it against the null tokens, which gives this for a batch of
            # one and fails or mixes samples for larger batches.)
            image_tokens = image_tokens[:, None].expand(-1, unet.null_image_embed.shape[1], -1)
        tokens.append(
            torch.where(image_keep[:, None, None], image_tokens, unet.null_image_embed.to(image_tokens.dtype))
        )
    context = torch.cat(tokens, dim=1) if len(tokens) > 1 else time_tokens

    mid_context = context
    if text_encodings is not None and unet.cond_on_text_encodings:
        mid_context = torch.cat((context, text_tokens(unet, text_encodings, text_mask, text_keep)), dim=1)
    return Conditioning(film, unet.norm_cond(context), unet.norm_mid_cond(mid_context))


def text_tokens(
    unet: "Unet", text_encodings: torch.Tensor, text_mask: Optional[torch.Tensor], text_keep: torch.Tensor
) -> torch.Tensor:
    """Projected text (B, max_text_len, cond_dim); padding and dropped samples become the null text tokens."""
    b, n, width = text_encodings.shape
    if b != text_keep.shape[0]:
        raise ValueError(f"Unet: text_encodings has batch size {b}, the images {text_keep.shape[0]}")
    if width != unet.text_embed_dim:
        raise ValueError(
            f"Unet: text_encodings are {width} wide but this U-Net was built with text_embed_dim={unet.text_embed_dim}"
        )
    max_len = unet.max_text_len
    if text_mask is None and unet.unmasked_text_padding:
        # Before 0.21.1: without a mask every given position is text, and the padding is zero tokens.
        tokens = F.pad(unet.text_to_cond(text_encodings[:, :max_len]), (0, 0, 0, max(0, max_len - n)))
        return torch.where(text_keep[:, None, None], tokens, unet.null_text_embed.to(tokens.dtype))
    if text_mask is None:
        valid = (text_encodings != 0).any(dim=-1)
    else:
        if text_mask.shape != (b, n):
            raise ValueError(f"Unet: text_mask has shape {tuple(text_mask.shape)}, expected {(b, n)}")
        valid = text_mask.bool()
    tokens = unet.text_to_cond(text_encodings[:, :max_len])
    valid = valid[:, :max_len]
    missing = max_len - tokens.shape[1]
    if missing > 0:
        tokens = F.pad(tokens, (0, 0, 0, missing))
        valid = F.pad(valid, (0, missing), value=False)
    keep = valid[:, :, None] & text_keep[:, None, None]
    return torch.where(keep, tokens, unet.null_text_embed.to(tokens.dtype))
