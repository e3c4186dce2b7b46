"""Noise schedules: pure functions from a number of steps to the betas of q(x_t | x_{t-1}).

Every schedule returns a float64 tensor of shape (timesteps,) with values in (0, 0.999], so
alphas_cumprod is strictly decreasing and stays positive (a beta of exactly 1 would make
1 / sqrt(alphas_cumprod) infinite at the last step and turn x_0 predictions into NaN).
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch

# Upper bound on any beta; improved DDPM (Nichol & Dhariwal 2021, sec. 3.2) clips at 0.999 for the
# same reason: the last steps of the cosine schedule would otherwise approach a singularity.
MAX_BETA = 0.999
MIN_BETA = 1e-8


def _finish(betas: torch.Tensor) -> torch.Tensor:
    return betas.clamp(MIN_BETA, MAX_BETA)


def _linear_range(timesteps: int) -> tuple[float, float]:
    # DDPM's 1e-4 .. 0.02 was chosen for T = 1000; scale it so that other T keep the same total noise.
    scale = 1000.0 / timesteps
    return scale * 1e-4, scale * 0.02


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Improved DDPM eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi / 2)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alphas_cumprod = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}
    return _finish(1 - alphas_cumprod[1:] / alphas_cumprod[:-1])


def linear_beta_schedule(timesteps: int) -> torch.Tensor:
    """DDPM (Ho et al. 2020, sec. 4): betas linear from 1e-4 to 0.02 (for T = 1000)."""
    start, end = _linear_range(timesteps)
    return _finish(torch.linspace(start, end, timesteps, dtype=torch.float64))


def quadratic_beta_schedule(timesteps: int) -> torch.Tensor:
    """Betas whose square roots are linear between those of the linear schedule's ends."""
    start, end = _linear_range(timesteps)
    return _finish(torch.linspace(start**0.5, end**0.5, timesteps, dtype=torch.float64) ** 2)


def jsd_beta_schedule(timesteps: int) -> torch.Tensor:
    """beta_t = 1 / (T - t + 1): 1/T, 1/(T-1), ..., 1 (Sohl-Dickstein et al. 2015), last clipped."""
    return _finish(1.0 / torch.linspace(timesteps, 1, timesteps, dtype=torch.float64))


def sigmoid_beta_schedule(timesteps: int, low: float = -6.0, high: float = 6.0) -> torch.Tensor:
    """Betas following a sigmoid between the linear schedule's ends (slow start and end)."""
    start, end = _linear_range(timesteps)
    ramp = torch.sigmoid(torch.linspace(low, high, timesteps, dtype=torch.float64))
    return _finish(ramp * (end - start) + start)


BETA_SCHEDULES: Dict[str, Callable[[int], torch.Tensor]] = {
    "cosine": cosine_beta_schedule,
    "linear": linear_beta_schedule,
    "quadratic": quadratic_beta_schedule,
    "jsd": jsd_beta_schedule,
    "sigmoid": sigmoid_beta_schedule,
}


def make_beta_schedule(name: str, timesteps: int) -> torch.Tensor:
    """Betas of the named schedule; raises ValueError naming the known schedules otherwise."""
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta_schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}")
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    return BETA_SCHEDULES[name](timesteps)
