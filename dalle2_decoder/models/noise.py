"""Where `Decoder.sample` draws its Gaussian noise: seeded generators, a function, or replayed tensors."""

from __future__ import annotations

from typing import Callable, Sequence, Tuple, Union

import torch

from .samplers import Generators, randn

NoiseFn = Callable[[Tuple[int, ...], torch.device, torch.dtype], torch.Tensor]
"""Where sampling draws its Gaussian noise: (shape, device, dtype) -> tensor."""


class ReplayedNoise:
    """A `noise` source for `Decoder.sample` that hands out given tensors in order.

    For reproducing a run exactly (e.g. the noise DALLE2-pytorch drew, recorded by the reference
    fixtures). Each call must ask for the next tensor's shape; running out is an error.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = list(tensors)
        self.used = 0

    def __call__(self, shape: Tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self.used >= len(self.tensors):
            raise ValueError(
                f"ReplayedNoise: sampling asked for noise tensor {self.used + 1} "
                f"but only {len(self.tensors)} were given"
            )
        tensor = self.tensors[self.used]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"ReplayedNoise: noise tensor {self.used + 1} has shape {tuple(tensor.shape)}, "
                f"sampling asked for {tuple(shape)}"
            )
        self.used += 1
        return tensor.to(device=device, dtype=dtype)


def sampling_noise(
    device: torch.device,
    generator: Generators = None,
    seed: Union[None, int, Sequence[int]] = None,
    noise: Union[None, NoiseFn, Sequence[torch.Tensor]] = None,
) -> NoiseFn:
    """The noise source of one `Decoder.sample` call (see its arguments): `noise` when given, else
    draws from `generator`, or from generators built from `seed` (one per sample when a list)."""
    if callable(noise):
        return noise
    if noise is not None:
        return ReplayedNoise(noise)
    if isinstance(seed, int):
        generator = torch.Generator(device=device).manual_seed(seed)
    elif seed is not None:
        generator = [torch.Generator(device=device).manual_seed(int(s)) for s in seed]

    def noise_fn(shape: Tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return randn(shape, generator, device, dtype)  # one generator per sample when a list

    return noise_fn
