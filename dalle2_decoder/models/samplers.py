"""Samplers: pure functions that turn initial noise into x_0 with a denoiser, for one U-Net.

A sampler is called as `sampler(denoise, schedule, noise, steps=..., generator=..., callback=...)`:

- `denoise(x, t)` runs the network (classifier-free guidance, low-res conditioning, self-conditioning
  already applied by the caller) on the batch `x` at the integer timestep `t` and returns a
  `ModelOutput`: the network's prediction (eps, x_0 or v, as `schedule.objective` says) and, for
  learned-variance models, the variance interpolation fraction;
- `schedule` holds the training schedule's alphas_cumprod (float64), the objective and the
  x_0 threshold (clamp or dynamic thresholding) applied to every x_0 estimate;
- `noise` is x_T; `generator` (one `torch.Generator`, or one per sample so that a sample's
  result does not depend on the batch it is in) draws the noise of stochastic samplers.

Every sampler makes exactly `steps` network calls (DDPM's full chain: `timesteps` calls). All
per-step coefficients are Python floats computed in float64 on the host, so sampling never waits
on the device. The solvers were checked step by step against diffusers' schedulers
(tests/test_samplers.py); they are written here from the papers, not taken from there.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

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


# --- step placement ---------------------------------------------------------------------------------


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


# --- samplers -----------------------------------------------------------------------------------------


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
    times = spaced_timesteps(schedule.num_timesteps, steps or schedule.num_timesteps)
    x = noise
    for i, (t, t_prev) in enumerate(zip(times[:-1], times[1:])):
        a, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
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
    times = spaced_timesteps(schedule.num_timesteps, steps or schedule.num_timesteps)
    x = noise
    for i, (t, t_prev) in enumerate(zip(times[:-1], times[1:])):
        a, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
        x0 = schedule.x_start(denoise(x, t), x, math.sqrt(a), math.sqrt(1.0 - a))
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1.0 - a)
        sigma = eta * math.sqrt(max((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev), 0.0))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma * sigma, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
        if callback is not None:
            callback(i, t, x)
    return x


def dpmpp_2m(
    denoise: Denoiser,
    schedule: Schedule,
    noise: torch.Tensor,
    *,
    steps: Optional[int] = None,
    generator: Generators = None,
    callback: Optional[StepCallback] = None,
    karras: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2, midpoint form) on the data prediction.

    First-order (DDIM) first step; the last step goes to sigma = 0 and returns the x_0 estimate.
    """
    points = solver_points(schedule, steps or schedule.num_timesteps, karras=karras)
    x = noise
    previous: Optional[torch.Tensor] = None
    n = len(points.timesteps)
    for i, t in enumerate(points.timesteps):
        alpha, sigma = points.alphas[i], points.sigmas[i]
        x0 = schedule.x_start(denoise(x, t), x, alpha, sigma)
        alpha_next, sigma_next = points.alphas[i + 1], points.sigmas[i + 1]
        if sigma_next == 0:
            x = x0  # the exact solution at sigma 0 of every order
        else:
            h = points.log_snr(i + 1) - points.log_snr(i)
            if previous is None or i == n - 1:
                data = x0
            else:
                r = (points.log_snr(i) - points.log_snr(i - 1)) / h
                data = x0 + (0.5 / r) * (x0 - previous)  # D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}
            x = (sigma_next / sigma) * x - (alpha_next * math.expm1(-h)) * data
        previous = x0
        if callback is not None:
            callback(i, t, x)
    return x


def _unipc_coefficients(order: int, hh: float, rks: List[float]) -> Tuple[List[float], float, float]:
    """UniPC's B(h) = e^hh - 1 variant ("bh2").

    The right-hand side b_k = (k-1)! phi_k(hh) hh / B(h) (Zhao et al. 2023, Thm 3.1).

    Returns (b_1..b_order, h phi_1(hh) = e^hh - 1, B(h)).
    """
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1
    h_phi_k = h_phi_1 / hh - 1.0  # phi_2 h-scaled; the recursion phi_{k+1} = (phi_k - 1/k!) / hh
    factorial = 1
    b = []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return b, h_phi_1, b_h


def _solve(rks: List[float], b: List[float]) -> List[float]:
    """rho solving sum_k rho_k r_k^(j-1) = b_j (j = 1..len(rks)), the Vandermonde system of UniPC."""
    size = len(rks)
    matrix = torch.tensor([[r**j for r in rks] for j in range(size)], dtype=torch.float64)
    return torch.linalg.solve(matrix, torch.tensor(b[:size], dtype=torch.float64)).tolist()


def unipc(
    denoise: Denoiser,
    schedule: Schedule,
    noise: torch.Tensor,
    *,
    steps: Optional[int] = None,
    generator: Generators = None,
    callback: Optional[StepCallback] = None,
    karras: bool = False,
    order: int = 2,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): the UniP-p predictor and UniC corrector, B(h) = e^h - 1, on the data prediction.

    The corrector reuses the network call of the next step, so it costs no extra calls; the last
    step is not corrected and goes to sigma 0. Order warms up from 1 and falls back near the end.
    """
    points = solver_points(schedule, steps or schedule.num_timesteps, karras=karras)
    n = len(points.timesteps)
    x = noise
    history: List[Tuple[float, torch.Tensor]] = []  # (lambda, x0) of earlier points, newest last
    last_x: Optional[torch.Tensor] = None
    last_order = 0
    for i, t in enumerate(points.timesteps):
        alpha, sigma = points.alphas[i], points.sigmas[i]
        model = schedule.x_start(denoise(x, t), x, alpha, sigma)
        lam = points.log_snr(i)
        if last_x is not None:
            # UniC: correct the predictor's x_i with the model value just computed at it.
            x = _unipc_update(last_x, history, points, i - 1, i, last_order, corrector_value=model)
        history.append((lam, model))
        history = history[-order:]
        this_order = min(order, n - i, i + 1)
        last_x, last_order = x, this_order
        if points.sigmas[i + 1] == 0 and this_order == 1:
            x = model
        else:
            x = _unipc_update(x, history, points, i, i + 1, this_order, corrector_value=None)
        if callback is not None:
            callback(i, t, x)
    return x


def _unipc_update(
    x: torch.Tensor,
    history: List[Tuple[float, torch.Tensor]],
    points: SolverPoints,
    source: int,
    target: int,
    order: int,
    corrector_value: Optional[torch.Tensor],
) -> torch.Tensor:
    """One UniP (corrector_value None) or UniC step from point `source` (x, history[-1]) to `target`."""
    lam_s, m0 = history[-1]
    h = points.log_snr(target) - lam_s
    hh = -h  # data-prediction form
    rks, differences = [], []
    for k in range(1, order):
        lam_k, m_k = history[-(k + 1)]
        r = (lam_k - lam_s) / h
        rks.append(r)
        differences.append((m_k - m0) / r)
    b, h_phi_1, b_h = _unipc_coefficients(order, hh, rks)
    alpha_t, sigma_t, sigma_s = points.alphas[target], points.sigmas[target], points.sigmas[source]
    out = (sigma_t / sigma_s) * x - (alpha_t * h_phi_1) * m0
    if corrector_value is None:
        if not differences:
            return out
        # UniP-2 uses rho = 1/2; higher orders solve the (order-1)-sized system.
        rhos = [0.5] if order == 2 else _solve(rks, b)
        residual = sum(rho * d for rho, d in zip(rhos, differences))
        return out - (alpha_t * b_h) * residual
    rhos = [0.5] if order == 1 else _solve(rks + [1.0], b)
    residual = rhos[-1] * (corrector_value - m0)
    for rho, d in zip(rhos[:-1], differences):
        residual = residual + rho * d
    return out - (alpha_t * b_h) * residual


SAMPLERS: Dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_karras": functools.partial(dpmpp_2m, karras=True),
    "unipc": unipc,
    "unipc_karras": functools.partial(unipc, karras=True),
}
"""Every sampler by the name the config and the command line use."""

SAMPLER_NAMES: Tuple[str, ...] = tuple(SAMPLERS)


def run_sampler(
    name: str,
    denoise: Denoiser,
    schedule: Schedule,
    noise: torch.Tensor,
    *,
    steps: Optional[int] = None,
    generator: Generators = None,
    callback: Optional[StepCallback] = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """Run the sampler called `name` (see `SAMPLERS`); `eta` applies to DDIM only."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    options = {"eta": eta} if name == "ddim" else {}
    return SAMPLERS[name](denoise, schedule, noise, steps=steps, generator=generator, callback=callback, **options)
