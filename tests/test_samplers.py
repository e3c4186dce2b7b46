"""The samplers against an independent implementation: diffusers' schedulers, step by step.

Both sides get the same alphas_cumprod, the same (fixed, nonlinear) model outputs at every point
and the same initial noise (and, for DDPM, the same generator stream); every intermediate x must
agree. The model is a deterministic function of (x, t), so any difference in where the solvers
evaluate it, or in the update formulas, shows up in the trajectory.
"""

from __future__ import annotations

import math

import diffusers  # a test dependency (setup.cfg, extra "test")
import pytest
import torch

from dalle2_decoder.models.samplers import (
    SAMPLERS,
    ModelOutput,
    Schedule,
    ddim,
    ddpm,
    dpmpp_2m,
    randn,
    solver_points,
    spaced_timesteps,
    unipc,
)
from dalle2_decoder.models.schedules import make_beta_schedule

from .numerics import FEW_ROUNDINGS, NETWORK, assert_close_to_scale

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes from inside diffusers

T = 100
SHAPE = (2, 3, 4, 4)
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}

SOLVER_ULPS = 2**8
"""How far our trajectory may be from diffusers' at each step, in ulps of that step's scale (max |x|
of diffusers' step). diffusers computes its coefficients in float32 from float32 alphas_cumprod, we
in float64: each step adds a few roundings of its scale, carried on by the later steps; up to ~70
ulps of scale measured (the 100-step DDPM chains: ~50) on every kernel path and thread count."""
FEW_KARRAS_EPS_CONDITION = 2**3
"""With 5 Karras steps and an eps model, the first three solver points have 1 / alpha = 2030, 425 and
56: x_0 = (x - sigma eps) / alpha multiplies the rounding of x by that much, and the multistep
solver extrapolates these estimates into the step to 1 / alpha = 3.4. Both trajectories, ours and
diffusers', are then ~600 and ~450 ulps of scale from the float64 one, ~1100 from each other."""


class FakeModel:
    """A fixed smooth nonlinear function of (x, t), standing in for a network; counts its calls."""

    def __init__(self, objective: str, channels_out: int = 3, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(channels_out, 3, generator=generator) * 0.5
        self.bias = torch.randn(channels_out, 1, 1, generator=generator) * 0.1
        self.objective = objective
        self.calls = []

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        self.calls.append(int(t))
        mixed = torch.einsum("oc,bchw->bohw", self.weight, x) + self.bias
        out = torch.tanh(mixed) * (1.0 + 0.3 * math.sin(0.05 * float(t)))
        if self.objective == "x0":
            out = 1.5 * out  # x_0 estimates beyond [-1, 1], so that thresholding matters
        return out


def betas_and_schedule(objective="eps", threshold=lambda x: x, schedule="cosine"):
    betas = make_beta_schedule(schedule, T).float()
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float32, as diffusers computes it
    return betas, Schedule(alphas_cumprod.double(), objective, threshold)


def clamp(x):
    return x.clamp(-1.0, 1.0)


def dynamic(x, percentile=0.9):
    s = torch.quantile(x.flatten(1).abs(), percentile, dim=1).clamp(min=1.0).reshape(-1, 1, 1, 1)
    return x.clamp(-s, s) / s


def ours(sampler, model, schedule, noise, **options):
    trajectory = []
    out = sampler(
        lambda x, t: ModelOutput(model(x, t)),
        schedule,
        noise.clone(),
        callback=lambda i, t, x: trajectory.append(x.clone()),
        **options,
    )
    return out, trajectory


def theirs(scheduler, model, noise, timesteps=None, steps=None, **step_options):
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps)
    else:
        scheduler.set_timesteps(steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)  # Karras spacing may repeat a timestep: count steps, do not look them up
    x, trajectory = noise.clone(), []
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, int(t)), t, x, **step_options).prev_sample
        trajectory.append(x.clone())
    return x, trajectory


def assert_same_trajectory(ours, reference, condition=1):
    """Every step of our trajectory within SOLVER_ULPS (times `condition`) of diffusers' step scale."""
    assert len(ours) == len(reference)
    for step, (x, y) in enumerate(zip(ours, reference)):
        assert_close_to_scale(x, y, ulps_of_scale=SOLVER_ULPS * condition, what=f"step {step}")


def threshold_options(kind):
    if kind == "clamp":  # dynamic thresholding with s capped at 1 is the plain clamp
        return clamp, dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.0)
    if kind == "dynamic":
        return dynamic, dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1e9)
    return (lambda x: x), dict(thresholding=False)


# --- step placement ---------------------------------------------------------------------------------


def test_spaced_timesteps_are_the_reference_ddim_points():
    assert spaced_timesteps(1000, 4) == [999, 749, 499, 249, -1]
    assert spaced_timesteps(10, 10) == list(range(9, -2, -1))
    with pytest.raises(ValueError, match="steps must be in"):
        spaced_timesteps(10, 11)


@pytest.mark.parametrize("karras", [False, True])
def test_solver_points_match_diffusers(karras):
    betas, schedule = betas_and_schedule(schedule="linear")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=betas.numpy(), use_karras_sigmas=karras, timestep_spacing="trailing"
    )
    scheduler.set_timesteps(20)
    points = solver_points(schedule, 20, karras=karras)
    assert points.timesteps == scheduler.timesteps.tolist()
    ve = [s / a for a, s in zip(points.alphas, points.sigmas)]
    torch.testing.assert_close(torch.tensor(ve, dtype=torch.float32), scheduler.sigmas, rtol=1e-5, atol=0)


# --- DDPM ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("steps", [None, 20])
def test_ddpm_matches_diffusers(objective, steps):
    betas, schedule = betas_and_schedule(objective, clamp)
    model = FakeModel(objective)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    out, mine = ours(ddpm, model, schedule, noise, steps=steps, generator=torch.Generator().manual_seed(2))
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=T,
        trained_betas=betas.numpy(),
        clip_sample=True,
        prediction_type=PREDICTION_TYPES[objective],
        variance_type="fixed_small",
    )
    timesteps = list(range(T - 1, -1, -1)) if steps is None else spaced_timesteps(T, steps)[:-1]
    _, reference = theirs(scheduler, model, noise, timesteps=timesteps, generator=torch.Generator().manual_seed(2))
    assert_same_trajectory(mine, reference)
    assert len(model.calls) == 2 * len(timesteps)


@pytest.mark.parametrize("steps", [None, 25])
def test_ddpm_with_learned_variance_matches_diffusers(steps):
    betas, schedule = betas_and_schedule("eps", clamp)
    model = FakeModel("eps", channels_out=6)  # prediction and variance channels, as learned-variance U-Nets give
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))

    def denoise(x, t):
        prediction, variance = model(x, t).chunk(2, dim=1)
        return ModelOutput(prediction, (variance + 1) / 2)  # the U-Net's [-1, 1] output as a fraction

    trajectory = []
    ddpm(
        denoise,
        schedule,
        noise.clone(),
        steps=steps,
        generator=torch.Generator().manual_seed(2),
        callback=lambda i, t, x: trajectory.append(x.clone()),
    )
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=T, trained_betas=betas.numpy(), clip_sample=True, variance_type="learned_range"
    )
    timesteps = list(range(T - 1, -1, -1)) if steps is None else spaced_timesteps(T, steps)[:-1]
    _, reference = theirs(scheduler, model, noise, timesteps=timesteps, generator=torch.Generator().manual_seed(2))
    if steps is None:
        assert_same_trajectory(trajectory, reference)
    else:
        # Respaced, diffusers still adds learned-variance noise on the last step (it tests t > 0, not whether
        # the step ends at x_0); improved DDPM's respaced chain, and ours, adds none there: compare up to it.
        assert_same_trajectory(trajectory[:-1], reference[:-1])
    # the learned variance changes the result: the fixed posterior variance gives another trajectory
    fixed = ddpm(
        lambda x, t: ModelOutput(model(x, t)[:, :3]),
        schedule,
        noise.clone(),
        steps=steps,
        generator=torch.Generator().manual_seed(2),
    )
    assert not torch.allclose(fixed, trajectory[-1], atol=1e-3)


# --- DDIM ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("threshold", ["clamp", "dynamic"])
def test_ddim_matches_diffusers(objective, threshold):
    function, options = threshold_options(threshold)
    betas, schedule = betas_and_schedule(objective, function)
    model = FakeModel(objective)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    _, mine = ours(ddim, model, schedule, noise, steps=20)
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=T,
        trained_betas=betas.numpy(),
        timestep_spacing="trailing",
        prediction_type=PREDICTION_TYPES[objective],
        clip_sample=False,
        **options,
    )
    _, reference = theirs(scheduler, model, noise, steps=20, eta=0.0, use_clipped_model_output=True)
    assert_same_trajectory(mine, reference)


def test_ddim_with_eta_draws_noise_from_the_generator_and_matches_diffusers():
    betas, schedule = betas_and_schedule("eps", clamp)
    model = FakeModel("eps")
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    _, mine = ours(ddim, model, schedule, noise, steps=10, eta=0.7, generator=torch.Generator().manual_seed(5))
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=T, trained_betas=betas.numpy(), timestep_spacing="trailing", clip_sample=True
    )
    _, reference = theirs(
        scheduler,
        model,
        noise,
        steps=10,
        eta=0.7,
        use_clipped_model_output=True,
        generator=torch.Generator().manual_seed(5),
    )
    # diffusers draws noise on the last step too (scaled by 0), we do not: compare all but the last step's draw order
    assert_same_trajectory(mine, reference)


# --- DPM-Solver++ (2M) and UniPC ------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("threshold", ["none", "clamp", "dynamic"])
def test_dpmpp_2m_matches_diffusers(objective, karras, threshold):
    function, options = threshold_options(threshold)
    betas, schedule = betas_and_schedule(objective, function)
    model = FakeModel(objective)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    _, mine = ours(dpmpp_2m, model, schedule, noise, steps=20, karras=karras)
    calls = list(model.calls)
    model.calls.clear()
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        trained_betas=betas.numpy(),
        prediction_type=PREDICTION_TYPES[objective],
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_karras_sigmas=karras,
        timestep_spacing="trailing",
        **options,
    )
    _, reference = theirs(scheduler, model, noise, steps=20)
    assert calls == model.calls and len(calls) == 20  # the same timesteps, one call each
    assert_same_trajectory(mine, reference)


@pytest.mark.parametrize("objective", ["eps", "v"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps", [5, 20])
def test_unipc_matches_diffusers(objective, karras, order, steps):
    betas, schedule = betas_and_schedule(objective, clamp)
    _, options = threshold_options("clamp")
    model = FakeModel(objective)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    _, mine = ours(unipc, model, schedule, noise, steps=steps, karras=karras, order=order)
    calls = list(model.calls)
    model.calls.clear()
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=T,
        trained_betas=betas.numpy(),
        prediction_type=PREDICTION_TYPES[objective],
        solver_order=order,
        solver_type="bh2",
        predict_x0=True,
        use_karras_sigmas=karras,
        timestep_spacing="trailing",
        **options,
    )
    _, reference = theirs(scheduler, model, noise, steps=steps)
    assert calls == model.calls and len(calls) == steps
    assert_same_trajectory(
        mine, reference, FEW_KARRAS_EPS_CONDITION if (steps, karras, objective) == (5, True, "eps") else 1
    )


# --- properties shared by all samplers ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_exact_denoiser_recovers_the_data_with_few_steps(name):
    """With the true x_0 (a denoiser that knows the answer), every sampler ends on it."""
    _, schedule = betas_and_schedule("x0")
    target = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    calls = []

    def denoise(x, t):
        calls.append(t)
        return ModelOutput(target)

    out = SAMPLERS[name](denoise, schedule, noise, steps=8, generator=torch.Generator().manual_seed(0))
    # the last step lands on x_0 itself through a few float32 operations
    assert_close_to_scale(out, target, ulps_of_scale=FEW_ROUNDINGS, what=name)
    assert len(calls) == 8


def test_per_sample_generators_make_each_row_independent_of_the_batch():
    gens = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    batch = randn((3, 2, 2), gens, torch.device("cpu"))
    alone = randn((1, 2, 2), [torch.Generator().manual_seed(8)], torch.device("cpu"))
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one per sample"):
        randn((2, 2), gens, torch.device("cpu"))


# --- the training loop and the evaluation sample with the configured sampler -----------------------------


def test_training_sample_phase_and_evaluation_use_the_configured_sampler(tmp_path, monkeypatch):
    from dalle2_decoder.config import TrainDecoderConfig
    from dalle2_decoder.models.unet import Unet
    from dalle2_decoder.training import TrainingRun

    from .evaluation_fixtures import write_networks
    from .training_fixtures import tiny_config, write_tiny_demo

    data = write_tiny_demo(tmp_path / "demo")
    networks = write_networks(tmp_path / "networks")
    raw = tiny_config(data, tmp_path / "run", epochs=1, epoch_samples=8, validation_samples=4, n_sample_images=2)
    raw["decoder"].update(samplers="dpmpp_2m_karras", sample_timesteps=3)  # of 20 timesteps
    raw["evaluate"] = {"n_evaluation_samples": 4, "FID": {"feature": networks["features"], "normalize": True}}
    run = TrainingRun(TrainDecoderConfig.from_dict(raw))
    calls = []
    original = Unet.forward_with_cond_scale

    def counting(self, x, time, **kwargs):
        calls.append(int(time[0]))
        return original(self, x, time, **kwargs)

    monkeypatch.setattr(Unet, "forward_with_cond_scale", counting)
    # Karras points differ from the evenly spaced ones DDIM (the default with sample_timesteps) would use.
    karras = solver_points(Schedule.from_betas(make_beta_schedule("cosine", 20)), 3, karras=True).timesteps
    assert karras != spaced_timesteps(20, 3)[:-1]

    run.examples = run.batches.share_examples(run.loaders, 2, run.accelerator)
    run._sample_phase()  # grids of train and test examples: one 3-call sampling each
    assert calls == karras * len(run.examples) and len(run.examples) == 2
    calls.clear()
    metrics = run.evaluate()  # 4 validation samples in one batch of 4
    assert calls == karras and metrics["eval/samples"] == 4
    run.tracker.finish()


# --- the decoder's choice of sampler --------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler, steps, calls",
    [
        (None, None, 20),  # the reference's DDPM over every timestep
        (None, 4, 4),  # the reference's DDIM where sample_timesteps is set
        ("ddim", None, 19),  # DDIM over all 20 timesteps: the reference spacing skips a repeated point
        ("ddpm", 4, 4),  # respaced DDPM (samplers.ddpm)
        ("dpmpp_2m_karras", 3, 3),
        ("unipc", 5, 5),
    ],
)
@pytest.mark.slow
def test_decoder_calls_its_unets_as_the_chosen_sampler_says(sampler, steps, calls, monkeypatch):
    from .test_models_decoder import EMBED, randomise_outputs, tiny_decoder

    decoder = randomise_outputs(tiny_decoder(num_unets=2, learned_variance=[True, False]))
    counts = {0: 0, 1: 0}
    for index, unet in enumerate(decoder.unets):
        original = unet.forward_with_cond_scale

        def counting(*args, _index=index, _original=original, **kwargs):
            counts[_index] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(unet, "forward_with_cond_scale", counting)
    embed = torch.randn(2, EMBED, generator=torch.Generator().manual_seed(0))
    images = decoder.sample(image_embed=embed, sampler=sampler, sample_timesteps=steps, seed=[3, 4])
    assert counts == {0: calls, 1: calls} and images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    # one seed per image: the second image alone is the same
    alone = decoder.sample(image_embed=embed[1:], sampler=sampler, sample_timesteps=steps, seed=[4])
    # Batch vs alone: the U-Nets at another batch size (NETWORK), carried along the chain, whose first
    # steps divide the prediction by sqrt(alpha_bar) (sqrt((1 - alpha_bar) / alpha_bar) = 406 at the
    # start of this 20-step cosine schedule) before clipping: up to ~1000 ulps of scale measured.
    assert_close_to_scale(alone, images[1:], ulps_of_scale=NETWORK * 2**4, what="alone vs batch")


def test_decoder_rejects_unknown_samplers_and_inpainting_off_the_reference_chains():
    from .test_models_decoder import EMBED, tiny_decoder

    with pytest.raises(ValueError, match='Decoder: samplers: unknown value "dpm"'):
        tiny_decoder(samplers="dpm")
    decoder = tiny_decoder(samplers="unipc", sample_timesteps=3)
    embed = torch.randn(1, EMBED)
    with pytest.raises(ValueError, match="steps must|sample_timesteps of U-Net 1 must be in"):
        decoder.sample(image_embed=embed, sample_timesteps=0)
    with pytest.raises(ValueError, match=r"inpainting \(RePaint\) runs on the ddpm or ddim chain"):
        decoder.sample(
            image_embed=embed, inpaint_image=torch.rand(1, 3, 8, 8), inpaint_mask=torch.ones(1, 8, 8, dtype=torch.bool)
        )
