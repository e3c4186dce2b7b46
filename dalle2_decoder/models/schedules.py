"""Noise schedules: pure functions from a number of steps to the betas of q(x_t | x_{t-1}).

Every schedule returns a float64 tensor of shape (timesteps,) with values in [0, 0.999], equal
to DALLE2-pytorch 1.15.6's (the derived constants are computed from it in float64 and stored
in float32, as there).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List

import torch

from ..common.problems import indexed, one_of, raise_problems

# Upper bound on a cosine beta, as improved DDPM (Nichol & Dhariwal 2021, sec. 3.2): the last
# steps of the cosine schedule would otherwise approach a singularity. The other schedules are
# left unclipped, exactly as DALLE2-pytorch computes them (checked by the reference fixtures).
MAX_BETA = 0.999


def _linear_range(timesteps: int) -> tuple[float, float]:
    # DDPM's 1e-4 .. 0.02 was chosen for T = 1000; scale it so that other T keep the same total noise.
    scale = 1000.0 / timesteps
    return scale * 1e-4, scale * 0.02


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Improved DDPM eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi / 2)."""
    steps = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    alphas_cumprod = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0.0, MAX_BETA)


def linear_beta_schedule(timesteps: int) -> torch.Tensor:
    """DDPM (Ho et al. 2020, sec. 4): betas linear from 1e-4 to 0.02 (for T = 1000)."""
    start, end = _linear_range(timesteps)
    return torch.linspace(start, end, timesteps, dtype=torch.float64)


def quadratic_beta_schedule(timesteps: int) -> torch.Tensor:
    """Betas whose square roots are linear between those of the linear schedule's ends."""
    start, end = _linear_range(timesteps)
    return torch.linspace(start**0.5, end**0.5, timesteps, dtype=torch.float64) ** 2


def jsd_beta_schedule(timesteps: int) -> torch.Tensor:
    """beta_t = 1 / (T - t + 1): 1/T, 1/(T-1), ..., 1 (Sohl-Dickstein et al. 2015).

    The last beta of exactly 1 makes alpha_bar_T zero and any x_0 prediction from the noise
    infinite at the first sampling step (the reference turns it into NaN); it is clipped to
    MAX_BETA here, the one documented difference from DALLE2-pytorch's schedules. The values are
    computed in float32, as the reference does.
    """
    return (1.0 / torch.linspace(timesteps, 1, timesteps)).clamp(max=MAX_BETA).double()


def sigmoid_beta_schedule(timesteps: int, low: float = -6.0, high: float = 6.0) -> torch.Tensor:
    """Betas following a sigmoid between the linear schedule's ends (slow start and end)."""
    start, end = _linear_range(timesteps)
    ramp = torch.sigmoid(torch.linspace(low, high, timesteps, dtype=torch.float64))
    return ramp * (end - start) + start


BETA_SCHEDULES: Dict[str, Callable[[int], torch.Tensor]] = {
    "cosine": cosine_beta_schedule,
    "linear": linear_beta_schedule,
    "quadratic": quadratic_beta_schedule,
    "jsd": jsd_beta_schedule,
    "sigmoid": sigmoid_beta_schedule,
}


def default_beta_schedules(num_unets: int) -> list[str]:
    """DALLE2-pytorch's default when beta_schedule is not given: cosine, and linear for the last U-Net of a cascade."""
    return ["cosine"] * max(num_unets - 1, 1) + (["linear"] if num_unets > 1 else [])


def shift_beta_schedule(betas: torch.Tensor, shift: float) -> torch.Tensor:
    """The schedule whose log-SNR is the given one's plus 2 log(shift) at every step (SNR times shift^2).

    Hoogeboom et al. 2023 (simple diffusion, sec. 3.1): a schedule tuned at resolution r0 leaves too
    much of a d-pixel image's layout visible at each noise level when d > r0 (neighbouring pixels
    average the noise away), so a U-Net at d pixels takes r0's log-SNR shifted by 2 log(r0 / d), that
    is shift = r0 / d < 1: more noise at every step. shift = 1 returns the betas unchanged.
    """
    if shift <= 0:
        raise ValueError(f"a schedule shift must be positive, got {shift}")
    if shift == 1:
        return betas
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    # alpha_bar = sigmoid(log SNR), so a shift of the log-SNR by 2 log(shift) is one of the logit.
    shifted = torch.sigmoid(torch.logit(alphas_cumprod) + 2.0 * math.log(shift))
    previous = torch.cat([torch.ones(1, dtype=shifted.dtype), shifted[:-1]])
    return (1 - shifted / previous).clamp(0.0, MAX_BETA)


def schedule_problems(
    path: str, name: Any, timesteps: int, timesteps_path: str = "timesteps", unet: str = ""
) -> List[str]:
    """The schedule must be one of BETA_SCHEDULES, and its betas below 1 at this many timesteps.

    DALLE2-pytorch scales the DDPM range (1e-4 .. 0.02 at T = 1000) by 1000 / T, so with 20 steps or
    fewer the last betas of the linear-range schedules reach 1 and every later constant is NaN; it
    trains on NaN. `unet` ("U-Net 2's ") says whose schedule it is where the path does not.
    """
    problems = one_of(path, name, BETA_SCHEDULES)
    if problems or not (isinstance(timesteps, int) and timesteps >= 1):
        return problems
    # On the CPU even where a model is built on the meta device (preflight sizes a decoder so), whose
    # tensors have no values to compare.
    with torch.device("cpu"):
        reaches_one = bool((BETA_SCHEDULES[name](timesteps) >= 1).any())
    if reaches_one:
        problems.append(
            f"{path}: {unet or 'the '}{name} schedule has betas of 1 or more with {timesteps_path} = {timesteps}; "
            "use more than 20 timesteps or the cosine schedule"
        )
    return problems


def beta_schedules_problems(
    path: str, beta_schedule: Any, num_unets: int, timesteps: int, timesteps_path: str = "timesteps"
) -> List[str]:
    """`schedule_problems` of each U-Net's schedule: one name, one per U-Net, or None (`default_beta_schedules`)."""
    if beta_schedule is None:
        path = f"{path} (null: linear for the last U-Net of a cascade)"
        names = default_beta_schedules(num_unets)
    else:
        names = list(beta_schedule) if isinstance(beta_schedule, (list, tuple)) else [beta_schedule]
    problems = []
    for index, name in enumerate(names):
        unet = f"U-Net {index + 1}'s " if beta_schedule is None else ""
        problems += schedule_problems(indexed(path, beta_schedule, index), name, timesteps, timesteps_path, unet)
    return problems


def make_beta_schedule(name: str, timesteps: int, shift: float = 1.0) -> torch.Tensor:
    """Betas of the named schedule, its log-SNR shifted by 2 log(shift) (`shift_beta_schedule`);
    raises ValueError for the schedules `schedule_problems` refuses."""
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    raise_problems("make_beta_schedule", schedule_problems("beta_schedule", name, timesteps))
    return shift_beta_schedule(BETA_SCHEDULES[name](timesteps), shift)
