"""DALLE2-pytorch's DDPM and DDIM chains, and RePaint inpainting on them.

These reproduce the reference's samples exactly for the same noise (tests/test_reference_parity_decoder.py):
every step runs on the U-Net's `GaussianDiffusion` float32 constants, DDIM walks the reference's
points (`base.ddim_timestep_pairs`, ending at timestep 0 rather than at the clean image), and the
noise is drawn in the reference's order, a draw included where DDIM's eta = 0 multiplies it away.
The Decoder samples its `ddpm` over every timestep and every `ddim` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

import torch

from .base import Denoiser, Generators, Schedule, StepCallback, ddim_timestep_pairs, randn

if TYPE_CHECKING:
    from ..gaussian_diffusion import GaussianDiffusion


@dataclass
class Inpainting:
    """Inpainting inputs of one U-Net's sampling, already at its size: image in [-1, 1], mask (B, 1, H, W) bool."""

    image: torch.Tensor
    mask: torch.Tensor
    resample_times: int


def reference_pairs(num_timesteps: int, steps: Optional[int]) -> List[Tuple[int, int]]:
    """(t, t_next) of the reference's chains: every timestep down to -1 (DDPM, steps None), or its DDIM points."""
    if steps is None:
        return [(t, t - 1) for t in reversed(range(num_timesteps))]
    return ddim_timestep_pairs(num_timesteps, steps)


def reference_chain(
    denoise: Denoiser,
    schedule: Schedule,
    noise: torch.Tensor,
    *,
    diffusion: "GaussianDiffusion",
    steps: Optional[int] = None,
    generator: Generators = None,
    callback: Optional[StepCallback] = None,
    eta: float = 0.0,
    inpainting: Optional[Inpainting] = None,
) -> torch.Tensor:
    """The reference's DDPM chain over every timestep (steps None) or its DDIM with `steps` steps.

    `schedule` gives the objective and the x_0 threshold, `diffusion` the constants the steps use.
    With `inpainting` (RePaint, Lugmayr et al. 2022), the known region is put back from the forward
    process before every network call and each step is repeated `resample_times` times, re-noised
    back to its timestep in between; the result keeps the known image exactly.
    """
    pairs = reference_pairs(diffusion.num_timesteps, steps)
    resample_times = inpainting.resample_times if inpainting is not None else 1
    x = noise

    def draw() -> torch.Tensor:
        return randn(noise.shape, generator, noise.device, torch.float32)

    for i, (t_now, t_next) in enumerate(pairs):
        is_last = t_now == 0 if steps is None else t_next == 0
        t = torch.full((x.shape[0],), t_now, device=x.device, dtype=torch.long)
        for r in reversed(range(resample_times)):
            if inpainting is not None:
                # RePaint: the known region comes from the forward process at t.
                x = torch.where(inpainting.mask, diffusion.q_sample(inpainting.image, t, draw()), x)
            x, renoise_from = _reference_step(
                denoise, schedule, diffusion, x, (t_now, t), t_next, steps, eta, is_last, draw
            )
            if inpainting is not None and not (is_last or r == 0):
                # Resampling: go back to step t and denoise again, harmonising the two regions.
                x = diffusion.q_sample_from_to(x, renoise_from, t, draw())
        if callback is not None:
            callback(i, t_now, x)
    if inpainting is not None:
        x = torch.where(inpainting.mask, inpainting.image, x)
    return x


def _reference_step(
    denoise: Denoiser,
    schedule: Schedule,
    diffusion: "GaussianDiffusion",
    x: torch.Tensor,
    now: Tuple[int, torch.Tensor],
    t_next: int,
    steps: Optional[int],
    eta: float,
    is_last: bool,
    draw: Callable[[], torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step from timestep `now` (as an int and as a batch): (x at the next timestep, the timesteps RePaint
    re-noises from)."""
    t_now, t = now
    output = denoise(x, t_now)
    x_start = schedule.threshold(diffusion.predict_start(schedule.objective, x, t, output.prediction))
    if steps is None:
        log_variance = None if output.variance is None else diffusion.log_variance_from_fraction(output.variance, t)
        return diffusion.ddpm_step(x, t, x_start, log_variance, draw()), t - 1
    t_before = torch.full_like(t, t_next)
    return diffusion.ddim_step(x, t, t_before, x_start, eta, None if is_last else draw()), t_before
