"""Learning-rate warm-up then cosine or linear decay (`train.lr_schedule`): the formula, the run's
length it decays over, its errors, and its position across a checkpoint and resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from accelerate import Accelerator

from dalle2_decoder.config import ConfigError, DecoderConfig, TrainConfig, TrainDecoderConfig, UnetConfig
from dalle2_decoder.training.loop import TrainingRun
from dalle2_decoder.training.summary import summary_lines
from dalle2_decoder.training.trainer import DecoderTrainer

from .conftest import TINY_UNET_OPTIONS
from .training_fixtures import tiny_config, write_tiny_demo

# The rates are float64 Python arithmetic (a cosine, a product, a sum): a handful of roundings of
# 2**-53 each, relative to the rate; 16 of them is far below any change of the formula.
RATE_REL = 16 * 2.0**-52


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    unet = UnetConfig(dim=8, image_embed_dim=4, dim_mults=(1,), options=TINY_UNET_OPTIONS)
    return DecoderConfig(unets=[unet, unet], image_sizes=[8, 16], timesteps=30).create()


def trainer_for(decoder, run_steps=None, **options) -> DecoderTrainer:
    config = TrainConfig(device="cpu", use_ema=False, **options)
    return DecoderTrainer(copy.deepcopy(decoder), Accelerator(cpu=True), config, run_steps=run_steps)


def take_steps(trainer: DecoderTrainer, count: int) -> None:
    for number in trainer.trained_unets:
        for _ in range(count):
            trainer.optimizers[number].step()  # no gradients: nothing moves; the scheduler's step is real
            trainer.schedulers[number].step()


def expected_rate(k, *, lr, warmup, schedule, decay_steps, min_ratio):
    """docs/TRAINING.md's formula, written out here on its own."""
    if warmup and k < warmup:
        return lr * (k + 1) / warmup
    if schedule == "constant":
        return lr
    w = warmup or 0
    span = decay_steps - w - 1
    t = min(k - w, span)
    lr_min = lr * min_ratio
    if schedule == "cosine":
        return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * t / span)) / 2
    return lr_min + (lr - lr_min) * (1 - t / span)


def rates(trainer, number, steps):
    found = []
    for _ in range(steps):
        found.append(trainer.unet_lr(number))
        take_steps(trainer, 1)
    return found


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_follows_the_documented_formula_per_unet(decoder, schedule):
    """U-Net 1: warm-up 3, decay over 13 steps to 10% of 1e-3; U-Net 2: no warm-up, its own length and
    floor. Every step's rate, past the end of the decay too (where it stays at the floor)."""
    options = dict(
        lr=[1e-3, 4e-4], warmup_steps=[3, None], lr_schedule=schedule, lr_min_ratio=[0.1, 0.0], lr_decay_steps=[13, 9]
    )
    trainer = trainer_for(decoder, **options)
    one = rates(trainer, 1, 18)
    trainer = trainer_for(decoder, **options)
    two = rates(trainer, 2, 18)
    want_one = [
        expected_rate(k, lr=1e-3, warmup=3, schedule=schedule, decay_steps=13, min_ratio=0.1) for k in range(18)
    ]
    want_two = [
        expected_rate(k, lr=4e-4, warmup=None, schedule=schedule, decay_steps=9, min_ratio=0.0) for k in range(18)
    ]
    assert one == pytest.approx(want_one, rel=RATE_REL, abs=0)
    assert two == pytest.approx(want_two, rel=RATE_REL, abs=1e-300)
    # The landmarks the formula promises: full rate on the first step after the warm-up, the floor
    # on the last step of the decay and after it.
    assert one[3] == pytest.approx(1e-3, rel=RATE_REL) and one[12] == pytest.approx(1e-4, rel=RATE_REL)
    assert one[17] == one[12] and two[0] == pytest.approx(4e-4, rel=RATE_REL) and two[8] == 0.0


def test_constant_is_the_default_and_keeps_the_rate_after_the_warm_up(decoder):
    assert TrainConfig().lr_schedule == "constant"
    trainer = trainer_for(decoder, lr=1e-3, warmup_steps=2)
    assert rates(trainer, 1, 6) == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3], rel=RATE_REL)


def test_without_lr_decay_steps_the_decay_spans_the_run(decoder):
    trainer = trainer_for(decoder, run_steps=7, lr=1e-3, lr_schedule="linear", lr_min_ratio=0.5)
    got = rates(trainer, 1, 8)
    want = [expected_rate(k, lr=1e-3, warmup=None, schedule="linear", decay_steps=7, min_ratio=0.5) for k in range(8)]
    assert got == pytest.approx(want, rel=RATE_REL)
    assert got[6] == pytest.approx(5e-4, rel=RATE_REL)  # the run's last step (6 of 0..6) is at the floor


def test_a_training_run_decays_over_its_epochs_times_its_optimizer_steps_per_epoch(tmp_path):
    """2 epochs x 24 samples / batch 4 = 12 batches; accumulating 2 per step: 6 optimizer steps."""
    data = write_tiny_demo(tmp_path / "demo")
    raw = tiny_config(data, tmp_path / "run", lr_schedule="cosine", lr_min_ratio=0.25, gradient_accumulation_steps=2)
    run = TrainingRun(TrainDecoderConfig.from_dict(raw))
    try:
        assert len(run.loaders["train"]) == 6
        summary = summary_lines(run.config, run.accelerator, run.trainer, run.loaders)
        assert "  lr U-Net 1     cosine from 0.001 to 0.25 x it over 6 optimizer steps" in summary
        got = rates(run.trainer, 1, 7)
    finally:
        run.tracker.finish(success=True)
    want = [expected_rate(k, lr=1e-3, warmup=None, schedule="cosine", decay_steps=6, min_ratio=0.25) for k in range(7)]
    assert got == pytest.approx(want, rel=RATE_REL)
    assert got[5] == pytest.approx(2.5e-4, rel=RATE_REL)


def test_a_resumed_trainer_continues_the_schedule_where_it_stopped(decoder):
    """The scheduler's position travels in the checkpoint state (through a weights-only file round
    trip): a trainer restored after 5 steps has the rates the uninterrupted one has from step 5 on."""
    options = dict(lr=2e-3, warmup_steps=2, lr_schedule="cosine", lr_min_ratio=0.05, lr_decay_steps=12)
    uninterrupted = trainer_for(decoder, **options)
    want = rates(uninterrupted, 1, 14)
    first = trainer_for(decoder, **options)
    take_steps(first, 5)
    import io

    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = trainer_for(decoder, **options)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert [group["lr"] for group in resumed.optimizers[1].param_groups] == [want[5]] * len(
        resumed.optimizers[1].param_groups
    )
    assert rates(resumed, 1, 9) == want[5:]


def test_unknown_run_length_is_a_config_error_naming_lr_decay_steps(decoder):
    with pytest.raises(ConfigError, match=r"train\.lr_decay_steps: the run's length is not known"):
        trainer_for(decoder, lr_schedule="cosine")
    with pytest.raises(ConfigError, match=r"train\.lr_decay_steps: the run has 4 optimizer steps"):
        trainer_for(decoder, run_steps=4, lr_schedule="linear", warmup_steps=3)


@pytest.mark.parametrize(
    "train, problem",
    [
        ({"lr_schedule": "cos"}, "train.lr_schedule:"),
        ({"lr_min_ratio": 1.5}, "train.lr_min_ratio: must be at most 1"),
        ({"lr_min_ratio": -0.1}, "train.lr_min_ratio:"),
        ({"lr_schedule": "cosine", "warmup_steps": 10, "lr_decay_steps": 11}, "train.lr_decay_steps: 11 leaves no"),
        ({"lr_decay_steps": [5, 6]}, "train.lr_decay_steps:"),
    ],
)
def test_bad_schedule_options_are_reported_with_their_path(minimal_config, config_problems, train, problem):
    minimal_config.setdefault("train", {}).update(train)
    found = config_problems(minimal_config)
    assert any(line.startswith(problem) for line in found), found
