"""The multistep ODE solvers: DPM-Solver++(2M) and UniPC, on the data (x_0) prediction.

Both integrate the probability-flow ODE in log-SNR between the points of `base.solver_points`
(evenly spaced timesteps, or Karras et al.'s noise levels) and end at sigma = 0 with the x_0
estimate; they were checked step by step against diffusers' schedulers (tests/test_samplers.py).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from .base import Denoiser, Generators, Schedule, SolverPoints, StepCallback, solver_points


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
