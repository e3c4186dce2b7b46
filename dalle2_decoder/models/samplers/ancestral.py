"""DDPM and DDIM on evenly spaced timesteps, in float64 host arithmetic, ending at the clean image.

These are the samplers a Schedule alone defines (checked step by step against diffusers in
tests/test_samplers.py). DALLE2-pytorch's own DDPM and DDIM chains, on a U-Net's float32 constants
and with its DDIM spacing, are in `reference.py`.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch

from .base import Denoiser, Generators, Schedule, StepCallback, randn, spaced_timesteps


def _spaced_steps(schedule: Schedule, steps: Optional[int]) -> Iterator[Tuple[int, int, int, float, float]]:
    """(step index, t, t', alpha-bar_t, alpha-bar_t') from T-1 down to the clean image (t' = -1, alpha-bar 1)."""
    times = spaced_timesteps(schedule.num_timesteps, steps or schedule.num_timesteps)
    for i, (t, t_prev) in enumerate(zip(times[:-1], times[1:])):
        yield i, t, t_prev, schedule.alpha_bar(t), schedule.alpha_bar(t_prev)


def ddpm(
    denoise: Denoiser,
    schedule: Schedule,
    noise: torch.Tensor,
    *,
    steps: Optional[int] = None,
    generator: Generators = None,
    callback: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) in the posterior form, on `steps` respaced steps.

    Fewer steps than T use the respaced process of improved DDPM (Nichol & Dhariwal 2021, sec. 4):
    beta'_i = 1 - alpha-bar_t / alpha-bar_t' between consecutive chosen timesteps. A learned variance
    interpolates between beta' and the posterior variance (improved DDPM eq. 15).
    """
    x = noise
    for i, t, t_prev, a, a_prev in _spaced_steps(schedule, steps):
        beta = 1.0 - a / a_prev
        output = denoise(x, t)
        x0 = schedule.x_start(output, x, math.sqrt(a), math.sqrt(1.0 - a))
        # DDPM eq. 7: posterior mean and variance of q(x_t' | x_t, x_0).
        mean = (math.sqrt(a_prev) * beta / (1.0 - a)) * x0 + (math.sqrt(a / a_prev) * (1.0 - a_prev) / (1.0 - a)) * x
        if t_prev >= 0:
            posterior_var = max(beta * (1.0 - a_prev) / (1.0 - a), 1e-20)
            if output.variance is None:
                std = math.sqrt(posterior_var)
            else:
                log_var = output.variance * math.log(beta) + (1.0 - output.variance) * math.log(posterior_var)
                std = torch.exp(0.5 * log_var)
            x = mean + std * randn(x.shape, generator, x.device, x.dtype)
        else:
            x = mean  # no noise on the last step: the mean is the sample
        if callback is not None:
            callback(i, t, x)
    return x


def ddim(
    denoise: Denoiser,
    schedule: Schedule,
    noise: torch.Tensor,
    *,
    steps: Optional[int] = None,
    generator: Generators = None,
    callback: Optional[StepCallback] = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12); eta interpolates between deterministic DDIM (0) and DDPM-like noise (1, eq. 16).

    eps is recomputed from the thresholded x_0, so both terms of eq. 12 agree with the clamp.
    """
    x = noise
    for i, t, _, a, a_prev in _spaced_steps(schedule, steps):
        x0 = schedule.x_start(denoise(x, t), x, math.sqrt(a), math.sqrt(1.0 - a))
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1.0 - a)
        sigma = eta * math.sqrt(max((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev), 0.0))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma * sigma, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
        if callback is not None:
            callback(i, t, x)
    return x
