"""What every sampler shares: the denoiser's answer, the schedule's constants, noise, and where steps go.

`ModelOutput` is what a denoiser returns, `Schedule` the training schedule's constants a sampler
reads, `randn` the noise of stochastic steps (one generator per sample keeps a sample independent of
its batch). The step placements: `spaced_timesteps` (evenly spaced, ending at the clean image),
`ddim_timestep_pairs` (DALLE2-pytorch's DDIM points, ending at timestep 0) and `solver_points`
(the ODE solvers' points, evenly spaced or Karras et al.'s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

Generators = Union[None, torch.Generator, Sequence[torch.Generator], Callable[..., torch.Tensor]]
"""One generator for the batch, one per sample (a sample's noise then depends on it alone), or a
function (shape, device, dtype) -> noise (e.g. the decoder's replayable noise source)."""


class ModelOutput(NamedTuple):
    """What the network said about a noisy batch at one timestep."""

    prediction: torch.Tensor
    """The (guided) prediction: eps, x_0 or v, per the schedule's objective."""
    variance: Optional[torch.Tensor] = None
    """Learned variance: v of improved DDPM eq. 15, in [0, 1] (log-variance = v log beta + (1 - v) log beta~)."""


Denoiser = Callable[[torch.Tensor, int], ModelOutput]
StepCallback = Callable[[int, int, torch.Tensor], None]
"""Called after each step with (step index, timestep, x after the step)."""


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class Schedule:
    """The constants of the training noise schedule that a sampler needs."""

    alphas_cumprod: torch.Tensor
    """(T,) float64 on the CPU: alpha-bar_t of DDPM eq. 4."""
    objective: str = "eps"
    """What the network predicts: `eps`, `x0` or `v`."""
    threshold: Callable[[torch.Tensor], torch.Tensor] = field(default=_identity)
    """Applied to every x_0 estimate (e.g. clamp to [-1, 1], or dynamic thresholding)."""

    @classmethod
    def from_betas(cls, betas: torch.Tensor, objective: str = "eps", threshold: Callable = _identity) -> "Schedule":
        return cls(torch.cumprod(1.0 - betas.double().cpu(), dim=0), objective, threshold)

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_bar(self, t: int) -> float:
        """alpha-bar at timestep t; t < 0 is the clean image (alpha-bar 1)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def x_start(self, output: ModelOutput, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """The thresholded x_0 estimate of `output` at a point with x = alpha x_0 + sigma eps."""
        pred = output.prediction
        if self.objective == "x0":
            x0 = pred
        elif self.objective == "v":
            x0 = alpha * x - sigma * pred  # Salimans & Ho 2022, sec. 4 (alpha^2 + sigma^2 = 1)
        elif self.objective == "eps":
            x0 = (x - sigma * pred) / alpha
        else:
            raise ValueError(f"unknown objective {self.objective!r}; expected eps, x0 or v")
        return self.threshold(x0)


def randn(
    shape: Sequence[int], generator: Generators, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal noise; with one generator per sample, row i comes from generator i alone."""
    if callable(generator):
        return generator(tuple(shape), device, dtype)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}; give one per sample")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


def spaced_timesteps(num_timesteps: int, steps: int) -> List[int]:
    """`steps` evenly spaced timesteps from T-1 down, followed by -1 (the clean image).

    The same points as the reference's DDIM (and diffusers' "trailing" spacing when steps divides T).
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    times = torch.linspace(-1, num_timesteps - 1, steps=steps + 1, dtype=torch.float64).round().long().tolist()
    return list(reversed(times))


def _vp_from_sigma(sigma: float) -> Tuple[float, float]:
    """(alpha_t, sigma_t) of the variance-preserving process at VE noise level sigma = sigma_t / alpha_t."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


@dataclass(frozen=True)
class SolverPoints:
    """Where an ODE solver evaluates the network: integer timesteps and the exact (alpha, sigma) it integrates to.

    `alphas` / `sigmas` have one more entry than `timesteps`: the end point (alpha 1, sigma 0).
    """

    timesteps: List[int]
    alphas: List[float]
    sigmas: List[float]

    def log_snr(self, i: int) -> float:
        """lambda_i = log(alpha_i / sigma_i) (DPM-Solver's half log-SNR); +inf at the clean end."""
        return math.inf if self.sigmas[i] == 0 else math.log(self.alphas[i] / self.sigmas[i])


def solver_points(schedule: Schedule, steps: int, karras: bool = False, rho: float = 7.0) -> SolverPoints:
    """The solver's points: evenly spaced timesteps, or Karras et al. 2022 (EDM) eq. 5 noise levels.

    With Karras spacing the VE noise levels sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho
    span the training schedule's range; the network is called at the timestep whose noise level
    is nearest in log-sigma (interpolated, then rounded), while the solver integrates to sigma_i exactly.
    """
    ac = schedule.alphas_cumprod
    if not karras:
        times = spaced_timesteps(schedule.num_timesteps, steps)[:-1]
        alphas = [math.sqrt(schedule.alpha_bar(t)) for t in times] + [1.0]
        sigmas = [math.sqrt(1.0 - schedule.alpha_bar(t)) for t in times] + [0.0]
        return SolverPoints(times, alphas, sigmas)
    ve = ((1.0 - ac) / ac).sqrt()  # increasing with t
    log_ve = ve.log()
    s_min, s_max = float(ve[0]), float(ve[-1])
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    levels = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    times = []
    for level in levels.tolist():
        if len(ve) == 1:  # a one-timestep schedule: nothing to interpolate between
            times.append(0)
            continue
        # piecewise-linear interpolation of t over log-sigma (log_ve is increasing in t)
        target = math.log(max(level, 1e-10))
        high = int(torch.searchsorted(log_ve, torch.tensor(target, dtype=torch.float64)).clamp(1, len(ve) - 1))
        low = high - 1
        w = (target - float(log_ve[low])) / (float(log_ve[high]) - float(log_ve[low]))
        times.append(int(round(low + min(max(w, 0.0), 1.0))))
    pairs = [_vp_from_sigma(level) for level in levels.tolist()]
    return SolverPoints(times, [a for a, _ in pairs] + [1.0], [s for _, s in pairs] + [0.0])


def ddim_timestep_pairs(num_timesteps: int, sample_timesteps: int) -> List[Tuple[int, int]]:
    """(t, t_next) pairs of DDIM sampling with `sample_timesteps` steps, as DALLE2-pytorch spaces them.

    sample_timesteps + 1 points are spaced evenly over [0, T) (the step at T itself left out), rounded
    down, and walked from the largest to 0; repeated points (when steps approach T) are skipped.
    """
    times = torch.linspace(0.0, num_timesteps, steps=sample_timesteps + 2)[:-1].int().tolist()
    times = list(reversed(times))
    return [(a, b) for a, b in zip(times[:-1], times[1:]) if a > b]
