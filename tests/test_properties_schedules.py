"""Properties of the schedules: EMA, learning rate, noise (betas), timestep spacings and sampler steps.

Expected values come from the formulas the docs and docstrings cite (DESIGN.md for the EMA,
the papers for betas and sampler steps), computed here in float64 with `math` over Python lists,
never by calling the function under test. They hold for any step count, including counts that
do not divide the number of timesteps and runs long enough for caps to bind.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction
from typing import List, Optional

import pytest
import torch
from accelerate import Accelerator
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dalle2_decoder.models.gaussian_diffusion import ddim_timestep_pairs
from dalle2_decoder.models.samplers import (
    SAMPLER_NAMES,
    ModelOutput,
    Schedule,
    run_sampler,
    solver_points,
    spaced_timesteps,
)
from dalle2_decoder.models.schedules import BETA_SCHEDULES, MAX_BETA, make_beta_schedule
from dalle2_decoder.training.ema import EMA, ema_decay
from dalle2_decoder.training.trainer import DecoderTrainer, warmup_factor

pytestmark = pytest.mark.usefixtures("compute_threads")

FLOAT32_EPS = 2.0**-23
FLOAT64_EPS = 2.0**-52


# --- EMA: ema-pytorch's schedule (DESIGN.md) ----------------------------------------------------


def documented_decay(count: int, beta: float, after: int, warmup: str = "power") -> float:
    """DESIGN.md: n = updates before this one minus `update_after_step`; 0 while n <= 0; else
    1 - (1 + n)^(-2/3) (`ratio`: (1 + n) / (10 + n)), capped at beta."""
    n = count - after
    if n <= 0:
        return 0.0
    value = 1.0 - (1.0 + n) ** (-2.0 / 3.0) if warmup == "power" else (1.0 + n) / (10.0 + n)
    return min(value, beta)


@given(
    count=st.integers(0, 10**7),
    beta=st.floats(0.0, 1.0),
    after=st.integers(0, 10**4),
    warmup=st.sampled_from(["power", "ratio"]),
)
def test_ema_decay_is_the_documented_warm_up_capped_at_beta(count, beta, after, warmup):
    """The decay of the update that finds `count` updates before it: 0 up to `update_after_step`,
    then ema-pytorch's 1 - (1 + n)^(-2/3) (or the `ratio` warm-up), never above `ema_beta`, for
    counts far beyond where the cap starts to bind."""
    got = ema_decay(count, beta=beta, warmup=warmup, update_after_step=after)
    assert got == pytest.approx(documented_decay(count, beta, after, warmup), rel=8 * FLOAT64_EPS, abs=0)
    assert 0.0 <= got <= beta


@settings(max_examples=25)
@given(
    updates=st.integers(1, 2500),
    beta=st.floats(0.5, 0.999),
    after=st.integers(0, 150),
    every=st.integers(1, 25),
    seed=st.integers(0, 1000),
)
def test_ema_follows_the_schedule_over_any_number_of_updates(updates, beta, after, every, seed):
    """EMA (DESIGN.md, ema-pytorch as DALLE2-pytorch uses it): the first update copies the weights;
    after it only every `update_every`-th update acts (counting from the first); such an update
    copies while at most `update_after_step` updates came before it, and otherwise moves the
    average to decay * average + (1 - decay) * weights with the documented decay. Checked against
    that rule written out, for any cadence, start and run length (the cap binds in long runs)."""
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(updates, generator=generator, dtype=torch.float64) * 2 - 1).tolist()
    network = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(network, beta=beta, update_after_step=after, update_every=every)
    expected: Optional[float] = None
    largest_decay = 0.0
    for count, target in enumerate(targets):
        with torch.no_grad():
            network.weight.fill_(target)
        ema.update(network)
        if count == 0 or (count % every == 0 and count <= after):
            expected = target
        elif count % every == 0:
            decay = documented_decay(count, beta, after)
            largest_decay = max(largest_decay, decay)
            expected = decay * expected + (1 - decay) * target
    got = float(ema.averaged.weight)
    # float32 lerps, each off by a few ulps; an error decays by the decay at each later update
    tolerance = 16 * FLOAT32_EPS / (1.0 - largest_decay)
    assert got == pytest.approx(expected, abs=tolerance)
    assert int(ema.num_updates) == updates


# --- learning rate ------------------------------------------------------------------------------


@given(step=st.integers(0, 10**6), warmup=st.one_of(st.none(), st.integers(0, 10**5)))
def test_warmup_factor_is_linear_then_one(step, warmup):
    """The learning-rate multiplier after `step` optimizer steps (DALLE2-pytorch's LambdaLR):
    min(1, (step + 1) / warmup_steps); 1 without warm-up (None or 0)."""
    expected = 1.0 if not warmup else min(1.0, Fraction(step + 1, warmup))
    assert warmup_factor(step, warmup) == pytest.approx(float(expected), rel=2 * FLOAT64_EPS)


def tiny_decoder():
    from dalle2_decoder.config import DecoderConfig, UnetConfig

    from .conftest import TINY_UNET_OPTIONS

    torch.manual_seed(0)
    unet = UnetConfig(dim=8, image_embed_dim=4, dim_mults=(1,), options=TINY_UNET_OPTIONS)
    return DecoderConfig(unets=[unet], image_sizes=[8], timesteps=30).create()


@pytest.fixture(scope="module")
def decoder():
    return tiny_decoder()


def trainer_for(decoder, lr: float, warmup: Optional[int]) -> DecoderTrainer:
    from dalle2_decoder.config import TrainConfig

    config = TrainConfig(device="cpu", lr=lr, warmup_steps=warmup, use_ema=False)
    return DecoderTrainer(copy.deepcopy(decoder), Accelerator(cpu=True), config)


@settings(max_examples=12)
@given(
    steps=st.integers(0, 40),
    lr=st.floats(1e-6, 1e-2),
    warmup=st.one_of(st.none(), st.integers(1, 50)),
    new_lr=st.floats(1e-6, 1e-2),
    new_warmup=st.one_of(st.none(), st.integers(1, 50)),
)
def test_learning_rate_follows_warm_up_also_after_a_resume_with_other_values(
    decoder, steps, lr, warmup, new_lr, new_warmup
):
    """After k optimizer steps a U-Net's rate is lr * min(1, (k + 1) / warmup_steps); a run resumed
    from that state with another `train.lr` and `train.warmup_steps` (applied, docs/TRACKING.md:
    "the warm-up continues from the optimizer steps already taken") has new_lr * min(1, (k + 1) /
    new_warmup) at once, in every parameter group, and goes on from there."""
    trainer = trainer_for(decoder, lr, warmup)
    optimizer, scheduler = trainer.optimizers[1], trainer.schedulers[1]
    for _ in range(steps):
        optimizer.step()  # no gradients: nothing moves, but the scheduler's step is a real one
        scheduler.step()

    def expected(rate, warm, k):
        return rate * (1.0 if not warm else min(1.0, (k + 1) / warm))

    assert trainer.unet_lr(1) == pytest.approx(expected(lr, warmup, steps), rel=1e-12)
    resumed = trainer_for(decoder, new_lr, new_warmup)
    resumed.load_state_dict(trainer.state_dict())
    want = expected(new_lr, new_warmup, steps)
    assert resumed.unet_lr(1) == pytest.approx(want, rel=1e-12)
    assert all(group["lr"] == pytest.approx(want, rel=1e-12) for group in resumed.optimizers[1].param_groups)
    resumed.optimizers[1].step()
    resumed.schedulers[1].step()
    assert resumed.unet_lr(1) == pytest.approx(expected(new_lr, new_warmup, steps + 1), rel=1e-12)


# --- noise schedules ----------------------------------------------------------------------------


def published_betas(name: str, timesteps: int) -> List[float]:
    """Each schedule's formula (models/schedules.py cites them), unclipped except where it says."""
    scale = 1000.0 / timesteps  # DDPM's 1e-4 .. 0.02 is for T = 1000, scaled by 1000 / T
    start, end = scale * 1e-4, scale * 0.02
    fraction = [i / (timesteps - 1) if timesteps > 1 else 0.0 for i in range(timesteps)]
    if name == "linear":
        return [start + (end - start) * f for f in fraction]
    if name == "quadratic":
        return [(math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * f) ** 2 for f in fraction]
    if name == "sigmoid":
        return [start + (end - start) / (1.0 + math.exp(-(-6.0 + 12.0 * f))) for f in fraction]
    if name == "cosine":  # improved DDPM eq. 17, betas clipped at 0.999
        s = 0.008

        def alpha_bar(t):
            return math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2

        return [min(max(1 - alpha_bar(t) / alpha_bar(t - 1), 0.0), MAX_BETA) for t in range(1, timesteps + 1)]
    if name == "jsd":  # 1 / (T - t + 1), the last (1) clipped to 0.999; the reference computes it in float32
        return [min(1.0 / (timesteps - i), MAX_BETA) for i in range(timesteps)]
    raise AssertionError(name)


@settings(max_examples=80)
@given(name=st.sampled_from(sorted(BETA_SCHEDULES)), timesteps=st.integers(1, 2000))
def test_every_beta_schedule_is_its_formula_for_any_count(name, timesteps):
    """Every schedule equals its published formula for any number of timesteps, not only for
    those that divide 1000; a count at which the formula reaches a beta of 1 or more (the scaled
    DDPM range for T <= 20) is refused with a ValueError rather than trained on NaN."""
    expected = published_betas(name, timesteps)
    # linear and quadratic end at 1000 / T x 0.02 = 20 / T exactly (one step: only the start, 0.1)
    if name in ("linear", "quadratic"):
        reaches_one = timesteps > 1 and Fraction(20, timesteps) >= 1
    else:
        reaches_one = max(expected) >= 1.0
    if reaches_one:
        with pytest.raises(ValueError, match="betas of 1 or more"):
            make_beta_schedule(name, timesteps)
        return
    got = make_beta_schedule(name, timesteps)
    assert got.dtype == torch.float64 and got.shape == (timesteps,)
    rel = 4 * FLOAT32_EPS if name == "jsd" else 1e-9
    assert got.tolist() == pytest.approx(expected, rel=rel, abs=1e-15)


@settings(max_examples=60)
@given(timesteps=st.integers(2, 2000), shift=st.floats(0.05, 4.0))
def test_a_shifted_schedule_moves_every_log_snr_by_twice_the_log_of_the_shift(timesteps, shift):
    """Hoogeboom et al. 2023: the shifted schedule's log-SNR is the cosine schedule's plus 2 log(shift)
    at every step (SNR = alpha_bar / (1 - alpha_bar)), for steps whose betas stay under the cap;
    shift 1 is the schedule itself."""
    # The published cosine alpha_bar, in float64 with math (as published_betas does).
    bars = [
        math.cos((i / timesteps + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
        for i in range(1, timesteps + 1)
    ]
    expected_bars = [1 / (1 + (1 - bar) / bar / shift**2) for bar in bars[:-1]]  # SNR x shift^2
    got = make_beta_schedule("cosine", timesteps, shift)
    got_bars = torch.cumprod(1 - got, 0).tolist()
    assert got.dtype == torch.float64 and got.shape == (timesteps,)
    assert make_beta_schedule("cosine", timesteps, 1.0).tolist() == make_beta_schedule("cosine", timesteps).tolist()
    # Until the first step whose beta hits the cap, the shifted alpha_bar is the formula's. Rounding:
    # the product of t float64 factors carries t roundings of relative size FLOAT64_EPS, and the
    # logit -> sigmoid round trip turns an absolute error of |logit| x eps in the logit into a
    # relative one of the same size in alpha_bar; 16 covers the few operations of each.
    capped = [i for i, beta in enumerate(got.tolist()) if beta >= MAX_BETA]
    last = min(capped[0] if capped else timesteps - 1, timesteps - 1)
    for i in range(last):
        logit = abs(math.log(expected_bars[i] / (1 - expected_bars[i])))
        bound = 16 * (i + 2 + logit) * FLOAT64_EPS
        assert got_bars[i] == pytest.approx(expected_bars[i], rel=bound, abs=1e-300)
    with pytest.raises(ValueError, match="positive"):
        make_beta_schedule("cosine", timesteps, 0.0)


# --- timestep spacings --------------------------------------------------------------------------


@st.composite
def counts_and_steps(draw, low_steps: int = 1, max_timesteps: int = 1000):
    """A number of timesteps and of steps in [low_steps, T], often right at or next to T."""
    timesteps = draw(st.integers(max(1, low_steps), max_timesteps))
    steps = draw(st.one_of(st.integers(low_steps, timesteps), st.integers(max(low_steps, timesteps - 2), timesteps)))
    return timesteps, steps


@settings(max_examples=150)
@given(counts=counts_and_steps())
def test_sampler_timesteps_are_the_nearest_to_even_spacing(counts):
    """`spaced_timesteps(T, steps)`: steps + 1 points from T-1 down to -1 (the clean image),
    strictly decreasing, each the integer nearest to -1 + j T / steps (j = steps .. 0)."""
    timesteps, steps = counts
    times = spaced_timesteps(timesteps, steps)
    assert len(times) == steps + 1 and times[0] == timesteps - 1 and times[-1] == -1
    assert all(a > b for a, b in zip(times, times[1:]))
    for k, t in enumerate(times):
        exact = Fraction(-1) + Fraction((steps - k) * timesteps, steps)
        assert abs(t - exact) <= Fraction(1, 2), (k, t, float(exact))


@given(timesteps=st.integers(1, 300), beyond=st.integers(1, 50), above=st.booleans())
def test_sampler_timesteps_refuse_counts_outside_one_to_t(timesteps, beyond, above):
    """Asking for fewer than 1 or more than T steps (just outside the range or far from it) is a
    ValueError naming the range."""
    steps = timesteps + beyond if above else 1 - beyond
    with pytest.raises(ValueError, match="steps must be in"):
        spaced_timesteps(timesteps, steps)


@settings(max_examples=150)
@given(counts=counts_and_steps())
def test_ddim_pairs_walk_the_reference_points_down_to_zero_without_repeats(counts):
    """DALLE2-pytorch's DDIM points (`ddim_timestep_pairs`): floor(j T / (steps + 1)) for
    j = 0 .. steps, walked from the largest to 0 in strictly decreasing pairs, each point once,
    repeated points (steps close to T) skipped, so at most `steps` network calls."""
    timesteps, steps = counts
    pairs = ddim_timestep_pairs(timesteps, steps)
    visited = [pairs[0][0]] + [b for _, b in pairs] if pairs else [0]
    assert all(a > b for a, b in pairs)
    assert all(first[1] == second[0] for first, second in zip(pairs, pairs[1:]))
    assert visited[-1] == 0 and len(pairs) <= steps
    allowed = []
    for j in range(steps + 1):
        exact = Fraction(j * timesteps, steps + 1)
        # an exact integer may come out one lower: the reference spaces the points in float32
        allowed.append({math.floor(exact)} | ({int(exact) - 1} if exact.denominator == 1 and exact > 0 else set()))
    assert all(any(t in options for options in allowed) for t in visited)
    assert all(options & set(visited) for options in allowed), "every point is visited"
    if timesteps > steps + 1:  # points at least one apart: all distinct
        assert len(pairs) == steps


def schedule_from(name: str, timesteps: int, objective: str = "x0") -> Schedule:
    return Schedule.from_betas(torch.tensor(published_betas(name, timesteps), dtype=torch.float64), objective)


def alpha_bars(name: str, timesteps: int) -> List[float]:
    values, running = [], 1.0
    for beta in published_betas(name, timesteps):
        running *= 1.0 - beta
        values.append(running)
    return values


def karras_level(bars: List[float], i: int, steps: int, rho: float) -> float:
    """EDM eq. 5: the i-th of `steps` VE noise levels between the schedule's largest and smallest."""
    s_min, s_max = math.sqrt((1 - bars[0]) / bars[0]), math.sqrt((1 - bars[-1]) / bars[-1])
    ramp = i / (steps - 1) if steps > 1 else 0.0
    return (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho


@settings(max_examples=60)
@given(
    name=st.sampled_from(["cosine", "linear"]),
    timesteps=st.integers(1, 1000),
    steps=st.integers(1, 60),
    rho=st.sampled_from([7.0, 3.0, 1.0]),
)
def test_karras_points_call_the_network_at_the_nearest_timestep(name, timesteps, steps, rho):
    """Karras et al. 2022 eq. 5 spacing (`solver_points(karras=True)`): VE noise levels
    sigma_i = (s_max^(1/rho) + i / (n - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho between the schedule's
    smallest and largest sqrt((1 - alpha_bar) / alpha_bar); the solver integrates to each exactly
    (alpha = 1 / sqrt(sigma^2 + 1), then the clean end), and the network is called at the integer
    timestep nearest to where log-sigma, interpolated linearly over t, equals log sigma_i."""
    assume(steps <= timesteps and (timesteps > 20 or name == "cosine"))
    schedule = schedule_from(name, timesteps)
    points = solver_points(schedule, steps, karras=True, rho=rho)
    bars = alpha_bars(name, timesteps)
    log_ve = [0.5 * math.log((1 - a) / a) for a in bars]
    assert len(points.timesteps) == steps and len(points.alphas) == len(points.sigmas) == steps + 1
    assert (points.alphas[-1], points.sigmas[-1]) == (1.0, 0.0)
    for i, t in enumerate(points.timesteps):
        level = karras_level(bars, i, steps, rho)
        alpha = 1.0 / math.sqrt(level * level + 1.0)
        assert points.alphas[i] == pytest.approx(alpha, rel=1e-9)
        assert points.sigmas[i] == pytest.approx(level * alpha, rel=1e-9)
        target = math.log(level)
        if timesteps == 1 or target <= log_ve[0]:
            where = 0.0
        elif target >= log_ve[-1]:
            where = float(timesteps - 1)
        else:
            high = next(k for k in range(1, timesteps) if log_ve[k] >= target)
            where = high - 1 + (target - log_ve[high - 1]) / (log_ve[high] - log_ve[high - 1])
        assert abs(t - where) <= 0.5 + 1e-6, (i, t, where)


# --- sampler steps ------------------------------------------------------------------------------


class KnowsTheData:
    """A denoiser that knows x_0: predicts it (objective x0), or the eps / v that go with it."""

    def __init__(self, x0: torch.Tensor, alpha_bar: List[float], objective: str):
        self.x0, self.alpha_bar, self.objective = x0, alpha_bar, objective
        self.calls: List[int] = []

    def __call__(self, x: torch.Tensor, t: int) -> ModelOutput:
        self.calls.append(t)
        if self.objective == "x0":
            return ModelOutput(self.x0)
        a = self.alpha_bar[t]
        eps = (x - math.sqrt(a) * self.x0) / math.sqrt(1 - a)
        if self.objective == "eps":
            return ModelOutput(eps)
        return ModelOutput(math.sqrt(a) * eps - math.sqrt(1 - a) * self.x0)  # v


@settings(max_examples=80)
@given(
    sampler=st.sampled_from(SAMPLER_NAMES),
    objective=st.sampled_from(["x0", "eps", "v"]),
    name=st.sampled_from(["cosine", "linear"]),
    counts=counts_and_steps(max_timesteps=400),
    seed=st.integers(0, 100),
)
def test_every_sampler_makes_steps_calls_and_lands_on_the_data_it_is_told(sampler, objective, name, counts, seed):
    """Every sampler makes exactly `steps` network calls, at timesteps in [0, T), from noisiest to
    cleanest; with a denoiser that knows x_0 (any objective: the eps or v that go with x_0 at
    the point sampled), every sampler returns x_0 whatever T and the number of steps, since
    each update is exact for a perfect prediction and the last one ends at noise level 0."""
    timesteps, steps = counts
    assume(timesteps > 20 or name == "cosine")
    karras = sampler.endswith("karras")
    assume(not (karras and objective != "x0"))  # Karras points integrate to noise levels between timesteps
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 3, 2, 2, generator=generator, dtype=torch.float64)
    noise = torch.randn(2, 3, 2, 2, generator=generator, dtype=torch.float64)
    denoiser = KnowsTheData(x0, alpha_bars(name, timesteps), objective)
    out = run_sampler(
        sampler, denoiser, schedule_from(name, timesteps, objective), noise, steps=steps, generator=generator, eta=0.5
    )
    assert len(denoiser.calls) == steps
    assert all(0 <= t < timesteps for t in denoiser.calls)
    assert denoiser.calls == sorted(denoiser.calls, reverse=True)
    # Errors grow with 1 / sqrt(alpha_bar) of the noisiest point, where eps-to-x_0 divides by it.
    scale = 1.0 / math.sqrt(alpha_bars(name, timesteps)[-1])
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6 * scale + 1e-9)


class Recorder:
    def __init__(self):
        self.states: List[torch.Tensor] = []
        self.times: List[int] = []

    def __call__(self, index: int, t: int, x: torch.Tensor) -> None:
        self.times.append(t)
        self.states.append(x.clone())


class Draws:
    """Noise as a function (shape, device, dtype): each call's draw is kept to recompute the step."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn: List[torch.Tensor] = []

    def __call__(self, shape, device, dtype):
        self.drawn.append(torch.randn(shape, generator=self.generator, dtype=torch.float64).to(dtype))
        return self.drawn[-1]


@settings(max_examples=50)
@given(
    name=st.sampled_from(["cosine", "linear"]),
    counts=counts_and_steps(max_timesteps=300),
    eta=st.sampled_from([0.0, 0.3, 1.0]),
    sampler=st.sampled_from(["ddpm", "ddim"]),
    seed=st.integers(0, 100),
)
def test_ddpm_and_ddim_steps_are_their_formulas(name, counts, eta, sampler, seed):
    """Each DDPM step is DDPM eq. 7 on the respaced process (beta' = 1 - alpha_bar_t / alpha_bar_t'):
    x' = sqrt(a') beta' / (1 - a) x_0 + sqrt(a / a') (1 - a') / (1 - a) x + sqrt(beta' (1 - a') / (1 - a)) z,
    without noise on the last step; each DDIM step is eq. 12 with eq. 16's sigma:
    x' = sqrt(a') x_0 + sqrt(1 - a' - s^2) eps + s z, s = eta sqrt((1 - a') / (1 - a) (1 - a / a')),
    eps = (x - sqrt(a) x_0) / sqrt(1 - a); both at the evenly spaced timesteps (a' = 1 at the end)."""
    timesteps, steps = counts
    assume(timesteps > 20 or name == "cosine")
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 3, 2, 2, generator=generator, dtype=torch.float64).clamp(-1, 1)
    noise = torch.randn(2, 3, 2, 2, generator=generator, dtype=torch.float64)
    bars = alpha_bars(name, timesteps)
    recorder, draws = Recorder(), Draws(seed)
    run_sampler(
        sampler,
        lambda x, t: ModelOutput(x0),
        schedule_from(name, timesteps),
        noise,
        steps=steps,
        generator=draws,
        callback=recorder,
        eta=eta,
    )
    times = recorder.times + [-1]
    assert len(times) == steps + 1
    assert all(
        abs(t - (Fraction(-1) + Fraction(j * timesteps, steps))) <= Fraction(1, 2)
        for j, t in zip(range(steps, -1, -1), times)
    )
    x, drawn = noise, iter(draws.drawn)
    for t, t_next, got in zip(times, times[1:], recorder.states):
        a, a_next = bars[t], (bars[t_next] if t_next >= 0 else 1.0)
        if sampler == "ddpm":
            beta = 1 - a / a_next
            want = math.sqrt(a_next) * beta / (1 - a) * x0 + math.sqrt(a / a_next) * (1 - a_next) / (1 - a) * x
            if t_next >= 0:
                want = want + math.sqrt(beta * (1 - a_next) / (1 - a)) * next(drawn)
        else:
            eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
            sigma = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
            want = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - sigma**2, 0.0)) * eps
            if sigma > 0:
                want = want + sigma * next(drawn)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        x = got
    assert next(drawn, None) is None, "no noise drawn beyond the formula's"


@settings(max_examples=40)
@given(
    name=st.sampled_from(["cosine", "linear"]),
    counts=counts_and_steps(low_steps=2, max_timesteps=300),
    karras=st.booleans(),
    seed=st.integers(0, 100),
)
def test_dpmpp_2m_steps_are_its_formula(name, counts, karras, seed):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): with h = lambda' - lambda (lambda = log alpha / sigma),
    x' = (sigma' / sigma) x - alpha' (e^-h - 1) D, where D is the x_0 prediction on the first step and
    (1 + 1 / (2 r)) x0_i - 1 / (2 r) x0_{i-1} after it, r = (lambda_i - lambda_{i-1}) / h; the last step,
    to noise level 0, returns the x_0 prediction."""
    timesteps, steps = counts
    assume(timesteps > 20 or name == "cosine")
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(2, 3, 2, 2, generator=generator, dtype=torch.float64)
    noise = torch.randn(2, 3, 2, 2, generator=generator, dtype=torch.float64)
    predictions: List[torch.Tensor] = []

    def denoise(x, t):  # a different x_0 at every call, so the second-order term matters
        predictions.append(base * (1 + 0.1 * len(predictions)))
        return ModelOutput(predictions[-1])

    recorder = Recorder()
    sampler = "dpmpp_2m_karras" if karras else "dpmpp_2m"
    run_sampler(sampler, denoise, schedule_from(name, timesteps), noise, steps=steps, callback=recorder)
    bars = alpha_bars(name, timesteps)
    if karras:  # eq. 5 levels (where the network is called is checked above)
        sigmas = [karras_level(bars, i, steps, 7.0) for i in range(steps)]
        alphas = [1.0 / math.sqrt(level * level + 1.0) for level in sigmas]
        sigmas = [level * alpha for level, alpha in zip(sigmas, alphas)]
    else:  # the evenly spaced timesteps (their placement is checked above)
        alphas = [math.sqrt(bars[t]) for t in recorder.times]
        sigmas = [math.sqrt(1 - bars[t]) for t in recorder.times]
    alphas, sigmas = alphas + [1.0], sigmas + [0.0]
    lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alphas, sigmas)]
    x = noise
    for i, got in enumerate(recorder.states):
        if sigmas[i + 1] == 0:
            want = predictions[i]
        else:
            h = lam[i + 1] - lam[i]
            if i == 0:
                data = predictions[0]
            else:
                r = (lam[i] - lam[i - 1]) / h
                data = (1 + 1 / (2 * r)) * predictions[i] - 1 / (2 * r) * predictions[i - 1]
            want = sigmas[i + 1] / sigmas[i] * x - alphas[i + 1] * math.expm1(-h) * data
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        x = got
