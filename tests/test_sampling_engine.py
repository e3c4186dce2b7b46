"""One sampling engine: `samplers.run_sampler` runs every chain, the reference's included, and the
Decoder reaches its U-Nets' chains through it, numbering U-Nets from 1."""

from __future__ import annotations

import pytest
import torch

from dalle2_decoder.models.gaussian_diffusion import GaussianDiffusion
from dalle2_decoder.models.samplers import (
    SAMPLER_NAMES,
    Inpainting,
    ModelOutput,
    Schedule,
    ddim_timestep_pairs,
    ddpm,
    network_calls,
    reference_chain,
    run_sampler,
    spaced_timesteps,
)

from .numerics import FEW_ROUNDINGS, assert_close_to_scale

T = 10
SHAPE = (2, 3, 4, 4)


def fixed_x0(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


def recording_denoiser(prediction: torch.Tensor, variance=None):
    """A denoiser that predicts a fixed x_0 (objective x0) and records the timesteps it is called at."""
    calls = []

    def denoise(x, t):
        calls.append(t)
        return ModelOutput(prediction, variance)

    return denoise, calls


@pytest.fixture
def diffusion():
    return GaussianDiffusion("cosine", T)


def schedule_of(diffusion: GaussianDiffusion) -> Schedule:
    return Schedule.from_betas(diffusion.betas_float64(), "x0")


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("steps", [None, 3])
def test_network_calls_is_what_run_sampler_calls(diffusion, name, steps):
    denoise, calls = recording_denoiser(fixed_x0())
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    steps_seen = []
    run_sampler(
        name,
        denoise,
        schedule_of(diffusion),
        noise,
        steps=steps,
        generator=torch.Generator().manual_seed(2),
        callback=lambda i, t, x: steps_seen.append(t),
        diffusion=diffusion,
    )
    assert len(calls) == len(steps_seen) == network_calls(name, steps, T)


def test_the_diffusion_selects_the_references_ddim_points(diffusion):
    """With the U-Net's diffusion, ddim walks DALLE2-pytorch's points (ending at timestep 0); without
    it, this package's evenly spaced DDIM (ending at the clean image)."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    reference, reference_calls = recording_denoiser(fixed_x0())
    ours, our_calls = recording_denoiser(fixed_x0())
    run_sampler("ddim", reference, schedule_of(diffusion), noise, steps=3, diffusion=diffusion)
    run_sampler("ddim", ours, schedule_of(diffusion), noise, steps=3)
    assert reference_calls == [t for t, _ in ddim_timestep_pairs(T, 3)]
    assert our_calls == spaced_timesteps(T, 3)[:-1]
    assert reference_calls != our_calls
    # ddim over every timestep: the reference's spacing skips the repeated point
    every, every_calls = recording_denoiser(fixed_x0())
    run_sampler("ddim", every, schedule_of(diffusion), noise, diffusion=diffusion)
    assert every_calls == [t for t, _ in ddim_timestep_pairs(T, T)]


def test_only_the_reference_chains_inpaint(diffusion):
    denoise, _ = recording_denoiser(fixed_x0())
    noise = torch.randn(SHAPE)
    image = fixed_x0(5)
    mask = torch.zeros(SHAPE[0], 1, *SHAPE[2:], dtype=torch.bool)
    mask[..., :2] = True
    inpainting = Inpainting(image=image, mask=mask, resample_times=2)
    for name, steps in (("ddpm", None), ("ddim", 3)):
        out = run_sampler(
            name, denoise, schedule_of(diffusion), noise, steps=steps, inpainting=inpainting, diffusion=diffusion
        )
        assert torch.equal(torch.where(mask, out, image), image)  # the known region is kept exactly
    for name, steps in (("ddpm", 3), ("dpmpp_2m", 3), ("unipc", 4)):
        with pytest.raises(ValueError, match=r"inpainting \(RePaint\) runs on the ddpm or ddim chain"):
            run_sampler(
                name, denoise, schedule_of(diffusion), noise, steps=steps, inpainting=inpainting, diffusion=diffusion
            )


def test_the_reference_ddpm_chain_and_ours_are_one_process(diffusion):
    """Over every timestep, the reference's DDPM (float32 constants of the diffusion) and ours (float64
    host coefficients) are the same process: same x_0, same learned-variance fraction, same noise
    stream, the same samples up to rounding. Each step's posterior mean and noise scale come from a
    few float32 roundings of constants and arithmetic (FEW_ROUNDINGS ulps of the sample's scale);
    with a fixed x_0 nothing amplifies them (the coefficient of x is below 1), so T steps add at most
    T times that."""
    x0 = fixed_x0()
    fraction = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    denoise, _ = recording_denoiser(x0, fraction)
    schedule = schedule_of(diffusion)

    def trajectory(chain, denoise, **options):
        states = []
        chain(
            denoise,
            schedule,
            noise,
            generator=torch.Generator().manual_seed(4),
            callback=lambda i, t, x: states.append(x),
            **options,
        )
        return states

    theirs = trajectory(reference_chain, denoise, diffusion=diffusion)
    ours = trajectory(ddpm, denoise)
    assert len(ours) == len(theirs) == T
    for step, (x, y) in enumerate(zip(ours, theirs)):  # the last step returns x_0 itself: compare every step
        assert_close_to_scale(x, y, ulps_of_scale=FEW_ROUNDINGS * T, what=f"reference vs our DDPM, step {step}")
    # a different fraction is a different process: the comparison sees it
    other, _ = recording_denoiser(x0, 1 - fraction)
    assert (trajectory(ddpm, other)[T // 2] - theirs[T // 2]).abs().max() > 1e-3


def test_sample_unet_takes_the_unet_number_from_one():
    from .test_models_decoder import EMBED, randomise_outputs, tiny_decoder

    decoder = randomise_outputs(tiny_decoder(num_unets=2, timesteps=6))
    embed = torch.randn(1, EMBED, generator=torch.Generator().manual_seed(0))
    seen = []
    conditions = dict(
        image_embed=embed, text_encodings=None, text_mask=None, lowres_cond_img=None, lowres_noise_level=None
    )
    images = decoder.sample_unet(
        1,
        (1, 3, 8, 8),
        cond_scale=1.0,
        unet_kwargs=conditions,
        noise_fn=lambda shape, device, dtype: torch.randn(shape, device=device, dtype=dtype),
        device=torch.device("cpu"),
        on_unet_call=seen.append,
    )
    assert images.shape == (1, 3, 8, 8) and seen == [1] * 6
    with pytest.raises(ValueError, match=r"unet_number must be in 1\.\.2"):
        decoder.sample_unet(0, (1, 3, 8, 8), cond_scale=1.0, unet_kwargs=conditions, noise_fn=None, device=None)
