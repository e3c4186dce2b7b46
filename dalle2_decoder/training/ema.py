"""Exponential moving average of one U-Net's weights."""
from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
from torch import nn


class EMA(nn.Module):
    """A frozen copy of a network whose weights trail the trained ones: ema <- d*ema + (1-d)*w.

    The decay d warms up as min(beta, (1 + n) / (10 + n)) after n updates: early in training the
    weights move fast, and a full-strength average would mix in the untrained start for thousands
    of steps (sample grids of pure noise); the warm-up lets the average follow until it can trail.

    Floating-point parameters and buffers are averaged; integer buffers (counters) are copied.
    The copy lives on the same device as the network, and updates are fused `_foreach` kernels, so
    an update costs one pass over the weights and never synchronises with the host.
    """

    def __init__(self, network: nn.Module, beta: float):
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"train.ema_beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.averaged = copy.deepcopy(network).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._count: Optional[int] = 0

    def train(self, mode: bool = True) -> "EMA":
        # The average is only ever used for inference.
        return super().train(False)

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        """Move the average one step towards `network`'s current weights."""
        if self._count is None:  # read back once (after creation or loading), not every step
            self._count = int(self.num_updates)
        n = self._count
        decay = min(self.beta, (1.0 + n) / (10.0 + n))
        source = dict(network.named_parameters())
        ema_params, new_params = [], []
        for name, averaged in self.averaged.named_parameters():
            ema_params.append(averaged)
            new_params.append(source[name].detach())
        if ema_params:
            torch._foreach_lerp_(ema_params, new_params, 1.0 - decay)
        source_buffers = dict(network.named_buffers())
        for name, averaged in self.averaged.named_buffers():
            new = source_buffers[name]
            if averaged.is_floating_point():
                averaged.lerp_(new.to(averaged.dtype), 1.0 - decay)
            else:
                averaged.copy_(new)
        self.num_updates += 1
        self._count += 1

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._count = None  # the loaded `num_updates` is read at the next update

    def copy_from(self, network: nn.Module) -> None:
        """Reset the average to `network`'s weights (e.g. when a pretrained U-Net is loaded)."""
        self.averaged.load_state_dict(network.state_dict())

    def averaged_state_dict(self) -> Dict[str, torch.Tensor]:
        return self.averaged.state_dict()
