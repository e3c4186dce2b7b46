"""The learning rate of each U-Net as a pure function of the optimizer steps taken.

A linear warm-up (DALLE2-pytorch's `LinearWarmup`), then one of:
- `constant` (the default, DALLE2-pytorch's behaviour): the configured rate from then on;
- `cosine`: half a cosine down to `lr * lr_min_ratio` (Loshchilov & Hutter 2017, "SGDR: Stochastic
  Gradient Descent with Warm Restarts", eq. 5, one cycle without restarts);
- `linear`: a straight line down to `lr * lr_min_ratio`.

The factor of optimizer step k (counted from 0) for a run of D decay steps and W warm-up steps:

    warm-up (k < W):   min(1, (k + 1) / W)
    after it, with t = min(k - W, T) and T = D - W - 1,
    cosine:            m + (1 - m) * (1 + cos(pi * t / T)) / 2
    linear:            m + (1 - m) * (1 - t / T)

with m = `lr_min_ratio`: the first step after the warm-up uses the full rate, step D - 1 (the last
of a run of D steps) the minimum, and any step after it (a run made longer on resume) stays there.
"""

from __future__ import annotations

import math
from typing import Optional

from ..config.train import LR_SCHEDULES


def warmup_factor(step: int, warmup_steps: Optional[int]) -> float:
    """Learning-rate multiplier after `step` optimizer steps: linear warm-up, then constant."""
    if not warmup_steps:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def lr_factor(
    step: int,
    *,
    warmup_steps: Optional[int] = None,
    schedule: str = "constant",
    decay_steps: Optional[int] = None,
    min_ratio: float = 0.0,
) -> float:
    """The multiplier of the configured rate at optimizer step `step` (from 0); see the module's formula."""
    warmup = warmup_steps or 0
    if schedule == "constant" or step < warmup:
        return warmup_factor(step, warmup_steps)
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose from {', '.join(LR_SCHEDULES)}")
    span = decay_span(decay_steps, warmup_steps)
    progress = min(step - warmup, span) / span
    if schedule == "cosine":
        shape = (1.0 + math.cos(math.pi * progress)) / 2.0
    else:
        shape = 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def decay_span(decay_steps: Optional[int], warmup_steps: Optional[int]) -> int:
    """T = D - W - 1: the steps from the first after the warm-up (full rate) to the last (the minimum)."""
    if decay_steps is None:
        raise ValueError("a decaying schedule needs its number of steps")
    span = decay_steps - (warmup_steps or 0) - 1
    if span < 1:
        raise ValueError(
            f"the decay needs at least 2 optimizer steps after the warm-up ({warmup_steps or 0} steps) "
            f"but the run has {decay_steps}"
        )
    return span


def run_optimizer_steps(epochs: int, batches_per_epoch: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps of a whole run: micro-batches run on across epochs, so a step every
    `gradient_accumulation_steps` of all the run's batches."""
    return (epochs * batches_per_epoch) // max(1, gradient_accumulation_steps)
