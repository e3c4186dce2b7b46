"""The training loop's counting, loss logging, non-finite stop and guidance scale, on the tiny demo data."""

import json

import pytest
import torch

from dalle2_decoder.config import TrainDecoderConfig
from dalle2_decoder.models import Unet
from dalle2_decoder.tracking import read_file
from dalle2_decoder.training import TrainingRun
from dalle2_decoder.training import loop as loop_module
from dalle2_decoder.training.loop import TrainingStopped

from .numerics import NETWORK, assert_close_to_scale, scale_of_combination
from .training_fixtures import tiny_config, write_tiny_demo


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_tiny_demo(tmp_path_factory.mktemp("demo"))


def metrics_lines(data_path):
    return [json.loads(line) for line in (data_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_short_last_batch_counts_by_its_size_and_losses_are_logged_as_window_means(demo_data, tmp_path, monkeypatch):
    monkeypatch.setattr(loop_module, "LOG_EVERY_N_STEPS", 3)
    data_path = tmp_path / "run"
    # exact epoch (no epoch_samples): 3 train shards of 16 = 48 samples in batches of 5: 9 of 5, then 3
    raw = tiny_config(demo_data, data_path, epochs=1, epoch_samples=None, validation_samples=None)
    raw["data"]["batch_size"] = 5
    run = TrainingRun(TrainDecoderConfig.from_dict(raw))
    losses, original = [], run.trainer.train_step

    def recording_step(batch):
        result = original(batch)
        losses.append(float(result[1]))
        return result

    run.trainer.train_step = recording_step
    assert run.execute() == 0
    assert len(losses) == 10
    assert run.progress.samples_seen == 48
    assert read_file(data_path / "latest.pth").state["progress"]["samples_seen"] == 48
    logged = [line for line in metrics_lines(data_path) if "train/loss/unet1" in line]
    assert [line["samples_seen"] for line in logged] == [15, 30, 45]
    for index, line in enumerate(logged):
        window = losses[3 * index : 3 * index + 3]
        assert line["train/loss/unet1"] == pytest.approx(sum(window) / 3, rel=1e-5)
        assert line["train/samples_per_s"] > 0 and line["train/lr/unet1"] > 0


@pytest.mark.slow
def test_a_streak_of_nonfinite_steps_stops_the_run_keeping_the_last_good_checkpoint(demo_data, tmp_path):
    data_path = tmp_path / "run"
    config = TrainDecoderConfig.from_dict(
        tiny_config(demo_data, data_path, epochs=3, epoch_samples=16, validation_samples=None)
    )
    run = TrainingRun(config)
    run.trainer.max_nonfinite_streak = 3
    original, calls = run.trainer.train_step, []

    def poisoned(batch):  # the second epoch's data turns into NaN
        calls.append(1)
        if len(calls) > 4:
            batch = {**batch, "image": torch.full_like(batch["image"], float("nan"))}
        return original(batch)

    run.trainer.train_step = poisoned
    with pytest.raises(TrainingStopped, match="3 optimizer steps in a row had non-finite gradients"):
        run.execute()
    assert len(calls) == 7  # 4 good steps, then 3 bad ones and the stop
    latest = read_file(data_path / "latest.pth")
    assert latest.state["progress"]["samples_seen"] == 16  # the end of the first epoch: good weights
    assert all(torch.isfinite(tensor).all() for tensor in latest.state["trainer"]["decoder"].values())


@pytest.mark.slow
def test_train_cond_scale_guides_the_sample_grids(demo_data, tmp_path, monkeypatch):
    config = TrainDecoderConfig.from_dict(tiny_config(demo_data, tmp_path / "run", epochs=1, cond_scale=2.5))
    run = TrainingRun(config)
    scales, original = [], Unet.forward_with_cond_scale

    def spy(unet, x, time, *, cond_scale=1.0, **kwargs):
        out = original(unet, x, time, cond_scale=cond_scale, **kwargs)
        cond = unet.forward(x, time, **kwargs)
        null = unet.forward(x, time, **kwargs, image_cond_drop_prob=1.0, text_cond_drop_prob=1.0)
        channels = unet.channels
        expected = null[:, :channels] + cond_scale * (cond[:, :channels] - null[:, :channels])
        # cond and null run as one batch in the guided forward: the U-Net's rounding at another batch
        # size, carried by the coefficients of (1 - cond_scale) * null + cond_scale * cond
        scale = scale_of_combination((1 - cond_scale, null[:, :channels]), (cond_scale, cond[:, :channels]))
        assert_close_to_scale(out[:, :channels], expected, ulps_of_scale=NETWORK, scale=scale, what="guided")
        scales.append(cond_scale)
        return out

    monkeypatch.setattr(Unet, "forward_with_cond_scale", spy)
    run.examples = run.batches.share_examples(run.loaders, 2, run.accelerator)
    run._sample_phase()
    assert scales and set(scales) == {2.5}
    run.tracker.finish()
