"""Exponential moving average of one U-Net's weights, with DALLE2-pytorch's update rule by default."""

from __future__ import annotations

import copy
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ..common.problems import raise_problems
from ..config.checks import in_range
from ..config.train import EMA_WARMUPS as EMA_WARMUPS
from ..config.train import ema_warmup_problems
from .sharding import is_sharded, local


def average_into(averaged: List[torch.Tensor], new: List[torch.Tensor], decay: float) -> None:
    """averaged <- decay * averaged + (1 - decay) * new, for every pair of floating-point tensors.

    One fused `_foreach` kernel over the whole list (one pass over the weights, no host sync),
    reached through torch's public EMA helper rather than the private `torch._foreach_lerp_`.
    """
    if averaged:
        get_ema_multi_avg_fn(decay)(averaged, new, None)


def ema_decay(count: int, *, beta: float, warmup: str = "power", update_after_step: int = 100) -> float:
    """Decay used by the update that finds `count` updates before it (0 means: copy the weights).

    `power` (the default, ema-pytorch's schedule as DALLE2-pytorch uses it): with
    n = count - update_after_step, decay = 1 - (1 + n) ** (-2/3), 0 while n <= 0, capped at `beta`.
    `ratio` (an option): decay = min(beta, (1 + n) / (10 + n)) with the same n, which trails the
    weights sooner in short runs.
    """
    raise_problems("ema_decay", ema_warmup_problems("warmup", warmup))
    n = count - update_after_step
    if n <= 0:
        return 0.0
    if warmup == "power":
        value = 1.0 - (1.0 + n) ** (-2.0 / 3.0)
    else:  # ratio
        value = (1.0 + n) / (10.0 + n)
    return min(max(value, 0.0), beta)


class EMA(nn.Module):
    """A frozen copy of a network whose weights trail the trained ones: ema <- d*ema + (1-d)*w.

    `update()` is called after every optimizer step. As in DALLE2-pytorch (ema-pytorch 0.8), the
    first call copies the weights; later calls act only every `update_every` calls: they copy the
    weights while at most `update_after_step` calls came before, then average with the decay of
    `ema_decay` (capped at `beta`). With `update_after_step=0, update_every=1, warmup="ratio"` it
    follows the weights from the first step, for runs too short for the reference's 100-step wait.

    Floating-point parameters and buffers are averaged; integer buffers (counters) are copied.
    The copy lives on the same device as the network, and updates are fused `_foreach` kernels, so
    an update costs one pass over the weights and never synchronises with the host. When the
    network and the copy are sharded alike (`training.sharding`), each process averages and copies
    its own shards: no communication.
    """

    def __init__(
        self,
        network: nn.Module,
        beta: float,
        *,
        update_after_step: int = 100,
        update_every: int = 10,
        warmup: str = "power",
    ):
        super().__init__()
        raise_problems("EMA", in_range("beta", beta, 0.0, 1.0) + ema_warmup_problems("warmup", warmup))
        self.beta = float(beta)
        self.update_after_step = int(update_after_step)
        self.update_every = max(1, int(update_every))
        self.warmup = warmup
        self.averaged = copy.deepcopy(network).eval().requires_grad_(False)
        # Calls of update() so far (ema-pytorch's `step`); saved, so a resumed run keeps the schedule.
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._count: Optional[int] = 0

    def train(self, mode: bool = True) -> "EMA":
        # The average is only ever used for inference.
        return super().train(False)

    @property
    def count(self) -> int:
        if self._count is None:  # read back once (after creation or loading), not every step
            self._count = int(self.num_updates)
        return self._count

    def current_decay(self) -> float:
        """The decay the next averaging update would use (0: it copies)."""
        return ema_decay(self.count, beta=self.beta, warmup=self.warmup, update_after_step=self.update_after_step)

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        """Count one optimizer step; copy or average `network`'s weights when the schedule says so."""
        n = self.count
        self.num_updates += 1
        self._count = n + 1
        if n == 0 or (n % self.update_every == 0 and n <= self.update_after_step):
            self.copy_from(network)
        elif n % self.update_every == 0:
            self._average(
                network, ema_decay(n, beta=self.beta, warmup=self.warmup, update_after_step=self.update_after_step)
            )

    def _average(self, network: nn.Module, decay: float) -> None:
        source = dict(network.named_parameters())
        ema_params, new_params = [], []
        for name, averaged in self.averaged.named_parameters():
            ema_params.append(local(averaged))
            new_params.append(local(source[name].detach()))
        average_into(ema_params, new_params, decay)
        source_buffers = dict(network.named_buffers())
        for name, averaged in self.averaged.named_buffers():
            new = source_buffers[name]
            if averaged.is_floating_point():
                averaged.lerp_(new.to(averaged.dtype), 1.0 - decay)
            else:
                averaged.copy_(new)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._count = None  # the loaded `num_updates` is read at the next update

    @torch.no_grad()
    def copy_from(self, network: nn.Module) -> None:
        """Set the average to `network`'s weights (the schedule's copies, or a pretrained U-Net loaded)."""
        if not is_sharded(self.averaged):
            self.averaged.load_state_dict(network.state_dict())
            return
        source = dict(network.named_parameters())
        source.update(network.named_buffers())
        for name, averaged in list(self.averaged.named_parameters()) + list(self.averaged.named_buffers()):
            local(averaged).copy_(local(source[name].detach()))

    def averaged_state_dict(self) -> Dict[str, torch.Tensor]:
        return self.averaged.state_dict()
