"""Post-hoc EMA (Karras et al. 2024, EDM2): the power-function profiles kept during training, their
snapshots, and the EMA of another length made from them, against one tracked directly in the same run."""

from __future__ import annotations

import copy
import math
import os
import signal

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from dalle2_decoder.config import ConfigError, DecoderConfig, TrainConfig, TrainDecoderConfig, UnetConfig
from dalle2_decoder.failures import EXIT_STOPPED
from dalle2_decoder.loading import load
from dalle2_decoder.posthoc_ema import main as posthoc_main
from dalle2_decoder.posthoc_ema import reconstruct
from dalle2_decoder.runtime import Sharding
from dalle2_decoder.training.loop import TrainingRun, main
from dalle2_decoder.training.posthoc_ema import (
    SNAPSHOT_FOLDER,
    PowerEMA,
    Profile,
    fit_profiles,
    gamma_from_sigma_rel,
    list_snapshots,
    profile_weights,
)
from dalle2_decoder.training.trainer import DecoderTrainer

from .conftest import TINY_UNET_OPTIONS
from .numerics import EPS32
from .training_fixtures import tiny_config, write_tiny_demo

FLOAT64_EPS = float(np.finfo(np.float64).eps)
EMA_ROUNDINGS = 3
"""Roundings per float32 EMA update of one weight, each at most eps32 / 2 of max |theta|: 1 - beta
rounded to float32 (its error times |theta - theta_hat|), the difference and the multiply-add of the
lerp. An earlier rounding is carried on multiplied by beta <= 1, so after N updates the average errs
by at most N * EMA_ROUNDINGS * eps32 * max |theta| (a generous bound: errors of opposite signs cancel)."""


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_tiny_demo(tmp_path_factory.mktemp("demo"))


def weights_by_formula(taus, t, gamma):
    """w_t(tau) = (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1), written directly (the module derives it)."""
    taus = np.asarray(taus, dtype=np.float64)
    return (taus / t) ** (gamma + 1) - ((taus - 1) / t) ** (gamma + 1)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.08, 0.1, 0.2, 0.28])
def test_the_exponent_gives_the_relative_standard_deviation_asked_for(sigma_rel):
    """gamma solves sigma_rel^2 = (g+1) / ((g+2)^2 (g+3)); and the discrete weights of a long profile
    with it have std(tau) / t = sigma_rel up to the O(1/t) of the discrete steps."""
    gamma = gamma_from_sigma_rel(sigma_rel)
    assert gamma > 0
    # The bisection stops within 4 float64 ulps of gamma; the equation's value moves by less than that.
    assert (gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)) == pytest.approx(sigma_rel**2, rel=64 * FLOAT64_EPS)
    t = 20_000
    taus = np.arange(1, t + 1)
    weights = weights_by_formula(taus, t, gamma)
    mean = float((weights * taus).sum())
    std = math.sqrt(float((weights * (taus - mean) ** 2).sum()))
    # Discretisation: the density tau^g over steps of 1 shifts the moments by O(1 / t) of t.
    assert std / t == pytest.approx(sigma_rel, abs=4.0 / t)


@pytest.mark.parametrize("t", [1, 2, 5, 3000])
def test_profile_weights_are_the_formula_and_sum_to_one(t):
    gamma = gamma_from_sigma_rel(0.2)  # a small exponent (about 1.8): early steps keep visible weight
    taus = np.arange(1, t + 1)
    ours = profile_weights(taus, gamma=gamma, start=0, count=t)
    # The direct form cancels: (tau/t)^(g+1) and ((tau-1)/t)^(g+1) differ by about (g+1)/tau of
    # themselves, so it loses about tau/(g+1) <= 3000 ulps relative; 1e-11 of each weight covers it.
    assert np.abs(ours - weights_by_formula(taus, t, gamma)).max() <= 1e-11 * ours.max()
    assert (np.abs(ours - weights_by_formula(taus, t, gamma)) <= 1e-11 * ours).all()
    assert float(ours.sum()) == pytest.approx(1.0, abs=t * FLOAT64_EPS)
    assert t > 1 or ours.tolist() == [1.0]  # one update: a copy
    shifted = profile_weights(np.arange(1, t + 11), gamma=gamma, start=10, count=t)
    assert (shifted[:10] == 0).all() and np.array_equal(shifted[10:], ours)


def test_power_ema_is_the_weighted_average_the_formula_says():
    torch.manual_seed(0)
    network = torch.nn.Linear(16, 8)
    sigma_rel = 0.1
    ema = PowerEMA(network, sigma_rel)
    gamma = gamma_from_sigma_rel(sigma_rel)
    history = []
    for _ in range(40):
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.1)
        history.append({name: p.detach().clone().double() for name, p in network.named_parameters()})
        ema.update(network)
    weights = weights_by_formula(np.arange(1, 41), 40, gamma)
    for name, averaged in ema.averaged.named_parameters():
        expected = sum(float(w) * step[name] for w, step in zip(weights, history))
        largest = max(float(step[name].abs().max()) for step in history)
        bound = 40 * EMA_ROUNDINGS * EPS32 * largest
        assert float((averaged.double() - expected).abs().max()) <= bound, name
    assert int(ema.num_updates) == 40


def test_a_profile_among_the_snapshots_is_fitted_exactly():
    gamma = gamma_from_sigma_rel(0.1)
    snapshots = [Profile(gamma, 0, t) for t in (20, 40, 60, 80)]
    fit = fit_profiles(snapshots, Profile(gamma, 0, 60))
    assert fit.coefficients == pytest.approx([0, 0, 1, 0], abs=1e-8)
    assert fit.residual_l1 < 1e-8 and abs(fit.residual_sum) < 1e-12
    # A target outside the span: the coefficients still sum to 1 (a weighted average of the weights
    # seen, so the error does not scale with their magnitude), to float64 solver rounding.
    mixed = [Profile(gamma_from_sigma_rel(s), 0, t) for t in (20, 40, 60, 80) for s in (0.05, 0.1)]
    fit = fit_profiles(mixed, Profile(gamma_from_sigma_rel(0.08), 0, 80))
    assert abs(float(fit.coefficients.sum()) - 1.0) < 1e-9 and abs(fit.residual_sum) < 1e-9
    assert 0 < fit.residual_l1 < 0.05


class WeightRange:
    """The elementwise smallest and largest value of each U-Net 1 tensor over the optimizer steps."""

    def __init__(self, run):
        self.unet = run.trainer.decoder.get_unet(1)
        self.low, self.high, self.steps = {}, {}, 0
        original = run.trainer.train_step

        def step_and_record(batch):
            losses = original(batch)
            self.steps += 1
            for name, tensor in self.unet.state_dict().items():
                if tensor.is_floating_point():
                    value = tensor.detach().double()
                    self.low[name] = torch.minimum(self.low.get(name, value), value)
                    self.high[name] = torch.maximum(self.high.get(name, value), value)
            return losses

        run.trainer.train_step = step_and_record


@pytest.mark.usefixtures("compute_threads")
def test_reconstruction_matches_an_ema_tracked_directly_in_the_same_run(demo_data, tmp_path):
    """A run keeps profiles 0.05, 0.10 and 0.08; the 0.08 EMA made from the 0.05 and 0.10 snapshots
    alone must equal the 0.08 one tracked during the run, within the bound the fit gives.

    The reconstruction is sum_tau (A x)(tau) theta_tau, the direct EMA sum_tau b(tau) theta_tau, so
    with r = A x - b and theta_ref the middle of each weight's range over the run,
    |difference| <= ||r||_1 * (max - min) / 2 + |theta_ref| * |sum r| (the fit's error), plus the
    float32 rounding of each EMA (EMA_ROUNDINGS per update) scaled by the coefficients."""
    data_path = tmp_path / "run"
    raw = tiny_config(
        demo_data,
        data_path,
        epochs=5,
        epoch_samples=48,
        posthoc_ema_sigma_rels=[0.05, 0.1, 0.08],
        posthoc_ema_every_n_steps=6,
    )
    run = TrainingRun(TrainDecoderConfig.from_dict(raw))
    recorded = WeightRange(run)
    assert run.execute() == 0
    steps = recorded.steps
    assert steps == 60

    snapshots = list_snapshots(data_path / SNAPSHOT_FOLDER)
    assert [s.updates for s in snapshots if s.sigma_rel == 0.08] == list(range(6, 61, 6))
    weights, fit, used, updates = reconstruct(data_path, 0.08, from_sigma_rels=[0.05, 0.1])
    assert updates == 60 and {s.sigma_rel for s in used} == {0.05, 0.1} and len(used) == 20
    direct = load_file(str(data_path / SNAPSHOT_FOLDER / "0000000060-sigma_rel-0.08.safetensors"))
    shortest = load_file(str(data_path / SNAPSHOT_FOLDER / "0000000060-sigma_rel-0.1.safetensors"))
    coefficient_sum = float(np.abs(fit.coefficients).sum())
    worst_ratio, bound_total, distance_total = 0.0, 0.0, 0.0
    for name, expected in direct.items():  # decoder names: `unets.0.` and the U-Net's own
        got = weights[name]
        if not expected.is_floating_point():
            continue
        low, high = recorded.low[name[len("unets.0.") :]], recorded.high[name[len("unets.0.") :]]
        largest = torch.maximum(low.abs(), high.abs())
        bound = (
            fit.residual_l1 * (high - low) / 2
            + ((high + low) / 2).abs() * abs(fit.residual_sum)
            + (coefficient_sum + 1) * steps * EMA_ROUNDINGS * EPS32 * largest
            + EPS32 * largest  # the combination's own rounding to float32
        )
        error = (got.double() - expected.double()).abs()
        worst_ratio = max(worst_ratio, float((error / bound.clamp(min=1e-30)).max()))
        bound_total += float(bound.sum())
        distance_total += float((shortest[name].double() - expected.double()).abs().sum())
    print(
        f"fit: residual L1 {fit.residual_l1:.3g}, sum {fit.residual_sum:.3g}, sum |x| {coefficient_sum:.3g}; "
        f"error / bound at most {worst_ratio:.3g}; bound summed {bound_total:.3g}, "
        f"|0.08 - 0.10 EMA| summed {distance_total:.3g}"
    )
    assert worst_ratio <= 1.0, f"reconstruction error is {worst_ratio:.3g} x the bound"
    # Not vacuous: summed over the weights, the bound is well below how far the 0.08 EMA is from the
    # nearest profile stored (0.10): a reconstruction that returned that snapshot would fail.
    assert bound_total < 0.5 * distance_total, (bound_total, distance_total)

    # The command writes a model save that load_decoder reads, holding the same reconstruction.
    out = tmp_path / "ema-0.08.safetensors"
    argv = ["--run", str(data_path), "--sigma_rel", "0.08", "--from_sigma_rels", "0.05", "0.1", "--out", str(out)]
    assert posthoc_main(argv) == 0
    loaded = load(out)
    assert loaded.weights == "model" and loaded.step == 60
    for name, tensor in loaded.decoder.get_unet(1).state_dict().items():
        assert torch.equal(tensor, weights[f"unets.0.{name}"]), name


@pytest.mark.usefixtures("compute_threads")  # a fixed thread count: the runs compare bit for bit
def test_profiles_continue_across_a_stop_and_resume(demo_data, tmp_path):
    """A run stopped after 7 of its 12 optimizer steps (a snapshot at 4 already written) and resumed
    writes the same snapshots as a run never stopped: the profiles' averages and counts are in the
    checkpoint, and the snapshots already on disk stay."""
    options = dict(epochs=2, epoch_samples=24, posthoc_ema_sigma_rels=[0.05, 0.1], posthoc_ema_every_n_steps=4)
    uninterrupted = tmp_path / "uninterrupted"
    assert main(TrainDecoderConfig.from_dict(tiny_config(demo_data, uninterrupted, **options))) == 0

    interrupted = tmp_path / "interrupted"
    config = TrainDecoderConfig.from_dict(tiny_config(demo_data, interrupted, **options))
    run = TrainingRun(config)
    original_step = run.trainer.train_step
    calls = []

    def step_then_signal(batch):
        losses = original_step(batch)
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGUSR1)
        return losses

    run.trainer.train_step = step_then_signal
    assert run.execute() == EXIT_STOPPED
    assert sorted(p.name[:10] for p in (interrupted / SNAPSHOT_FOLDER).iterdir()) == ["0000000004"] * 2
    resumed = TrainingRun(config)
    assert resumed.execute() == 0 and resumed.resumed
    assert resumed.trainer.posthoc.updates == 12

    names = sorted(p.name for p in (uninterrupted / SNAPSHOT_FOLDER).iterdir())
    assert names == sorted(p.name for p in (interrupted / SNAPSHOT_FOLDER).iterdir())
    assert len(names) == 6  # updates 4, 8 and 12, two profiles each
    for name in names:
        expected = load_file(str(uninterrupted / SNAPSHOT_FOLDER / name))
        got = load_file(str(interrupted / SNAPSHOT_FOLDER / name))
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=f"{name} {key}")


def tiny_decoder():
    torch.manual_seed(0)
    unet = UnetConfig(dim=8, image_embed_dim=4, dim_mults=(1,), options=TINY_UNET_OPTIONS)
    return DecoderConfig(unets=[unet], image_sizes=[8], timesteps=30).create()


def test_sharded_training_refuses_post_hoc_ema_naming_the_option():
    accelerator = Accelerator(cpu=True)
    config = TrainConfig(device="cpu", posthoc_ema_sigma_rels=[0.05, 0.1])
    with pytest.raises(ConfigError, match=r"train\.posthoc_ema_sigma_rels: post-hoc EMA is not supported with sharded"):
        # as `runtime.create_run` gives the sharding of an FSDP launch
        DecoderTrainer(copy.deepcopy(tiny_decoder()), accelerator, config, sharding=Sharding())


def test_off_by_default():
    assert TrainConfig().posthoc_ema_sigma_rels is None
    trainer = DecoderTrainer(tiny_decoder(), Accelerator(cpu=True), TrainConfig(device="cpu"))
    assert trainer.posthoc is None and "posthoc_ema" not in trainer.state_dict()


@pytest.mark.parametrize(
    "train, problem",
    [
        ({"posthoc_ema_sigma_rels": [0.05, 0.3]}, "train.posthoc_ema_sigma_rels[1]: must be in (0, 0.28]"),
        ({"posthoc_ema_sigma_rels": [0.0]}, "train.posthoc_ema_sigma_rels[0]:"),
        ({"posthoc_ema_sigma_rels": []}, "train.posthoc_ema_sigma_rels: give at least one"),
        ({"posthoc_ema_sigma_rels": [0.1, 0.1]}, "train.posthoc_ema_sigma_rels: each profile once"),
        ({"posthoc_ema_every_n_steps": 0}, "train.posthoc_ema_every_n_steps:"),
    ],
)
def test_bad_post_hoc_options_are_reported_with_their_path(minimal_config, config_problems, train, problem):
    minimal_config.setdefault("train", {}).update(train)
    found = config_problems(minimal_config)
    assert any(line.startswith(problem) for line in found), found


def test_a_fresh_run_over_an_old_one_clears_its_snapshots(tmp_path):
    """`tracker.overwrite_data_path` removes the previous run's snapshots: left there, the fit would
    mix two runs' weights."""
    from dalle2_decoder.tracking.run_state import prepare_data_path

    (tmp_path / SNAPSHOT_FOLDER).mkdir()
    (tmp_path / SNAPSHOT_FOLDER / "0000001000-sigma_rel-0.05.safetensors").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("the user's")
    prepare_data_path(tmp_path, overwrite=True, auto_resume=False, say=lambda line: None)
    assert not (tmp_path / SNAPSHOT_FOLDER).exists() and (tmp_path / "notes.txt").exists()
