"""A fixed analytic stand-in for a U-Net, for decoder-level parity fixtures (pure torch).

The decoder's diffusion, losses, conditioning plumbing and sampling loops are compared between
DALLE2-pytorch and this package independently of any U-Net architecture: both decoders get this
same small closed-form network installed on their U-Net objects (the objects stay, so the
decoders still read `self_cond`, `lowres_cond`, `cond_on_text_encodings` and the rest from them).

out = tanh(Wx x + Wl lowres + Ws self_cond + bt t/1000 + bn level/1000 + bi mean(image_embed) + bx mean(text))

Each term is present only when its input is (image and text terms also only when the U-Net is
conditioned on them and the sample keeps its conditioning). Condition dropout must be 0 or 1
(deterministic); guidance follows DALLE2-pytorch's `forward_with_cond_scale` (all output channels).
Every call appends its (x, time) to `unet.standin_trace`, so tests compare whole sampling chains.
Imported by scripts/reference_fixtures/decoder_cases.py and tests/test_reference_parity_decoder.py.
"""

from __future__ import annotations

import types
from typing import Dict, Optional

import torch

COEFFICIENT_NAMES = ("wx", "wl", "ws", "bt", "bn", "bi", "bx")


def make_coefficients(channels: int, channels_out: int, seed: int) -> Dict[str, torch.Tensor]:
    """Random but fixed coefficients for one U-Net (saved with the fixtures)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"wx": (channels_out, channels), "wl": (channels_out, channels), "ws": (channels_out, channels)}
    out = {name: torch.randn(shape, generator=g) * 0.5 for name, shape in shapes.items()}
    for name in ("bt", "bn", "bi", "bx"):
        out[name] = torch.randn(channels_out, generator=g)
    return out


def _keep(prob: float) -> bool:
    if prob not in (0, 1):
        raise ValueError(f"stand-in network: condition dropout must be 0 or 1 (deterministic), got {prob}")
    return prob == 0


def _mix(weight: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,bchw->bohw", weight, image)


def standin_forward(
    self,
    x: torch.Tensor,
    time: torch.Tensor,
    *,
    image_embed: Optional[torch.Tensor] = None,
    text_encodings: Optional[torch.Tensor] = None,
    lowres_cond_img: Optional[torch.Tensor] = None,
    lowres_noise_level: Optional[torch.Tensor] = None,
    self_cond: Optional[torch.Tensor] = None,
    image_cond_drop_prob: float = 0.0,
    text_cond_drop_prob: float = 0.0,
    **unused,
) -> torch.Tensor:
    c = self.standin_coefficients
    self.standin_trace.append((x.detach().clone(), time.detach().clone()))
    h = _mix(c["wx"], x) + c["bt"][None, :, None, None] * (time.float() / 1000)[:, None, None, None]
    if lowres_cond_img is not None:
        h = h + _mix(c["wl"], lowres_cond_img)
    if self_cond is not None:
        h = h + _mix(c["ws"], self_cond)
    if lowres_noise_level is not None:
        h = h + c["bn"][None, :, None, None] * (lowres_noise_level.float() / 1000)[:, None, None, None]
    if getattr(self, "cond_on_image_embeds", False) and image_embed is not None and _keep(image_cond_drop_prob):
        h = h + c["bi"][None, :, None, None] * image_embed.mean(-1)[:, None, None, None]
    if getattr(self, "cond_on_text_encodings", False) and text_encodings is not None and _keep(text_cond_drop_prob):
        h = h + c["bx"][None, :, None, None] * text_encodings.mean((1, 2))[:, None, None, None]
    return torch.tanh(h)


def standin_forward_with_cond_scale(
    self, x: torch.Tensor, time: torch.Tensor, *, cond_scale: float = 1.0, **kwargs
) -> torch.Tensor:
    """Classifier-free guidance over all output channels, as DALLE2-pytorch's U-Net."""
    logits = self.forward(x, time, **kwargs)
    if cond_scale == 1:
        return logits
    null = self.forward(x, time, image_cond_drop_prob=1.0, text_cond_drop_prob=1.0, **kwargs)
    return null + (logits - null) * cond_scale


def install(unet: torch.nn.Module, coefficients: Dict[str, torch.Tensor], with_cond_scale: bool = True) -> None:
    """Make `unet` compute the stand-in network (on this object only)."""
    unet.standin_coefficients = coefficients
    unet.standin_trace = []
    unet.forward = types.MethodType(standin_forward, unet)
    if with_cond_scale:
        unet.forward_with_cond_scale = types.MethodType(standin_forward_with_cond_scale, unet)
