"""Samplers: pure functions that turn initial noise into x_0 with a denoiser, for one U-Net.

Every chain the package samples with lives here, and `run_sampler` is the one door the Decoder
goes through. A sampler is called as `sampler(denoise, schedule, noise, steps=..., generator=..., callback=...)`:

- `denoise(x, t)` runs the network (classifier-free guidance, low-res conditioning, self-conditioning
  already applied by the caller) on the batch `x` at the integer timestep `t` and returns a
  `ModelOutput`: the network's prediction (eps, x_0 or v, as `schedule.objective` says) and, for
  learned-variance models, the variance interpolation fraction;
- `schedule` holds the training schedule's alphas_cumprod (float64), the objective and the
  x_0 threshold (clamp or dynamic thresholding) applied to every x_0 estimate;
- `noise` is x_T; `generator` (one `torch.Generator`, or one per sample so that a sample's
  result does not depend on the batch it is in) draws the noise of stochastic samplers.

Every sampler makes exactly `steps` network calls (DDPM's full chain: `timesteps` calls). The
modules: `base` (what they share, step placement), `ancestral` (DDPM, DDIM), `solvers`
(DPM-Solver++, UniPC) and `reference` (DALLE2-pytorch's DDPM and DDIM chains on a U-Net's float32
constants, with RePaint inpainting). Per-step coefficients of `ancestral` and `solvers` are Python
floats computed in float64 on the host, so sampling never waits on the device; they were checked
step by step against diffusers' schedulers (tests/test_samplers.py) and are written here from the
papers, not taken from there.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

import torch

from .ancestral import ddim, ddpm
from .base import (  # noqa: F401 (the samplers' names, imported from here)
    Denoiser,
    Generators,
    ModelOutput,
    Schedule,
    SolverPoints,
    StepCallback,
    ddim_timestep_pairs,
    randn,
    solver_points,
    spaced_timesteps,
)
from .reference import Inpainting, reference_chain, reference_pairs
from .solvers import dpmpp_2m, unipc  # noqa: F401

if TYPE_CHECKING:
    from ..gaussian_diffusion import GaussianDiffusion

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


def runs_reference_chain(name: str, steps: Optional[int]) -> bool:
    """Whether a U-Net's `diffusion` makes `name` with `steps` (None: every timestep) the reference's chain:
    `ddim` always, `ddpm` over every timestep; the others, and DDPM on fewer steps, are this package's."""
    return name == "ddim" or (name == "ddpm" and steps is None)


def _reference_steps(name: str, steps: Optional[int], num_timesteps: int) -> Optional[int]:
    """The steps of the reference chain `name` runs: None for DDPM's chain, DDIM's count (all timesteps if None)."""
    return (steps or num_timesteps) if name == "ddim" else None


def network_calls(name: str, steps: Optional[int], num_timesteps: int) -> int:
    """The steps (network calls, RePaint's resampling aside) of `run_sampler` with a U-Net's diffusion."""
    if runs_reference_chain(name, steps):
        return len(reference_pairs(num_timesteps, _reference_steps(name, steps, num_timesteps)))
    return steps or num_timesteps


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
    diffusion: Optional["GaussianDiffusion"] = None,
    inpainting: Optional[Inpainting] = None,
) -> torch.Tensor:
    """Run the sampler called `name` (see `SAMPLERS`); `eta` applies to DDIM only.

    Given the U-Net's `diffusion` (the Decoder always gives it), the chains `runs_reference_chain`
    names are DALLE2-pytorch's (`reference.reference_chain`, `ddim` over every timestep where steps
    is None); only they can inpaint.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    if diffusion is not None and runs_reference_chain(name, steps):
        return reference_chain(
            denoise,
            schedule,
            noise,
            diffusion=diffusion,
            steps=_reference_steps(name, steps, diffusion.num_timesteps),
            generator=generator,
            callback=callback,
            eta=eta,
            inpainting=inpainting,
        )
    if inpainting is not None:
        raise ValueError(f"inpainting (RePaint) runs on the ddpm or ddim chain, not on {name} with {steps} steps")
    options = {"eta": eta} if name == "ddim" else {}
    return SAMPLERS[name](denoise, schedule, noise, steps=steps, generator=generator, callback=callback, **options)


# The names above are imported from here (`from dalle2_decoder.models.samplers import ddim`); the
# package's public surface is what the README's "Public API" lists, and it lists none of them.
__all__: list = []
