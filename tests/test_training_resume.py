"""A checkpoint continues its run, also when the config changed: each change applied or refused, and said."""

import os
import signal

import pytest

from dalle2_decoder.config import TrainDecoderConfig
from dalle2_decoder.failures import EXIT_STOPPED
from dalle2_decoder.tracking import read_file
from dalle2_decoder.training import TrainingRun, main
from dalle2_decoder.training.resume import describe_changes, reference_progress

from .training_fixtures import tiny_config, write_tiny_demo

pytestmark = pytest.mark.usefixtures("compute_threads")  # the loop keeps the test's threads


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_tiny_demo(tmp_path_factory.mktemp("demo"))


def change_lines(out):
    return [line for line in out.splitlines() if line.startswith("config change on resume: ")]


def test_tracker_load_continues_the_run_with_more_epochs_and_another_rate(demo_data, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(TrainDecoderConfig.from_dict(tiny_config(demo_data, first, epochs=1, epoch_samples=8))) == 0
    done = read_file(first / "latest.pth").state
    assert done["trainer"]["counters"]["step"] == 2
    capsys.readouterr()

    raw = tiny_config(demo_data, tmp_path / "second", epochs=2, epoch_samples=8, lr=5e-4)
    raw["tracker"]["load"] = {"load_from": "local", "file_path": str(first / "latest.pth")}
    assert main(TrainDecoderConfig.from_dict(raw)) == 0
    out = capsys.readouterr().out
    assert "training starts fresh" not in out
    lines = change_lines(out)
    assert any(line.startswith("config change on resume: train.epochs: 1 -> 2: applied") for line in lines), lines
    assert any(line.startswith("config change on resume: train.lr: 0.001 -> 0.0005: applied") for line in lines), lines
    # Only what changed is listed (the data path of the tracker, the epochs and the rate).
    assert all(
        line.split(": ")[1].split(":")[0] in ("tracker.data_path", "train.epochs", "train.lr") for line in lines
    ), lines
    assert "resumed from local file" in out and "epoch 2, 8 samples seen, step 2" in out

    state = read_file(tmp_path / "second" / "latest.pth").state
    assert state["progress"]["epoch"] == 2 and state["progress"]["samples_seen"] == 16  # one more epoch, not two
    trainer = state["trainer"]
    assert trainer["counters"]["step"] == 4  # steps continue from the checkpoint's 2
    assert int(trainer["emas"]["1"]["num_updates"]) == 4
    optimizer = trainer["optimizers"]["1"]
    assert {float(s["step"]) for s in optimizer["state"].values()} == {4.0}  # the moments went on, not restarted
    assert all(group["lr"] == pytest.approx(5e-4) for group in optimizer["param_groups"])  # the new rate applied


def test_auto_resume_applies_a_changed_learning_rate_and_says_so(demo_data, tmp_path, capsys):
    data_path = tmp_path / "run"
    run = TrainingRun(TrainDecoderConfig.from_dict(tiny_config(demo_data, data_path, epochs=1, epoch_samples=16)))
    original_step = run.trainer.train_step
    calls = []

    def step_then_signal(batch):
        losses = original_step(batch)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return losses

    run.trainer.train_step = step_then_signal
    assert run.execute() == EXIT_STOPPED and run.interrupted
    capsys.readouterr()

    resumed = TrainingRun(
        TrainDecoderConfig.from_dict(tiny_config(demo_data, data_path, epochs=1, epoch_samples=16, lr=2e-4))
    )
    resumed.load_start_checkpoint()
    out = capsys.readouterr().out
    assert change_lines(out) == [
        "config change on resume: train.lr: 0.001 -> 0.0002: applied "
        "(set on the restored optimizers from now on; their moments are kept)"
    ]
    assert resumed.trainer.unet_lr(1) == pytest.approx(2e-4)
    assert all(g["lr"] == pytest.approx(2e-4) for g in resumed.trainer.optimizers[1].param_groups)
    assert resumed.resumed and resumed.progress.batches_in_epoch == 2 and resumed.trainer.step == 2
    resumed.tracker.finish()


def test_every_change_is_applied_or_refused_in_one_line():
    saved = {
        "seed": 1,
        "train": {"epochs": 1, "lr": 1e-3, "wd": 0.01},
        "data": {"batch_size": 4, "num_workers": 2},
        "tracker": {"data_path": "a"},
    }
    current = {
        "seed": 1,
        "train": {"epochs": 3, "lr": 1e-3, "wd": 0.02},
        "data": {"batch_size": 8, "num_workers": 2},
        "tracker": {"data_path": "b"},
    }
    changes = describe_changes(saved, current, epoch=1, mid_epoch=True)
    assert [c.path for c in changes] == ["data.batch_size", "tracker.data_path", "train.epochs", "train.wd"]
    by_path = {c.path: c for c in changes}
    assert not by_path["data.batch_size"].applied  # the position inside the epoch cannot be kept
    assert "restarts from its first batch" in by_path["data.batch_size"].line()
    assert all(by_path[p].applied for p in ("tracker.data_path", "train.epochs", "train.wd"))
    assert all("\n" not in c.line() and c.line().startswith(f"config change on resume: {c.path}: ") for c in changes)
    # Between epochs, another batch size is simply applied.
    assert describe_changes(saved, current, epoch=1, mid_epoch=False)[0].applied
    # Fewer epochs than already done: applied, and it says nothing is left.
    fewer = describe_changes({"train": {"epochs": 5}}, {"train": {"epochs": 2}}, epoch=3, mid_epoch=False)
    assert "nothing is left to train" in fewer[0].line()


def test_reference_progress_maps_each_next_task():
    info = {
        "epoch": 2,
        "sample": 96,
        "next_task": "train",
        "samples_seen": 1000,
        "validation_losses": [0.5, 0.25],
        "num_trained_unets": 2,
    }
    train = reference_progress(info, batch_samples=32, save_every=100)
    assert (train["epoch"], train["phase"], train["batches_in_epoch"], train["samples_seen"]) == (2, "train", 3, 1000)
    assert train["best_val_loss"] == 0.5 and train["next_save_at"] == 1100  # their mean over U-Nets, our sum
    assert reference_progress({**info, "next_task": "val"}, batch_samples=32, save_every=100)["phase"] == "validate"
    after_save = reference_progress({**info, "next_task": "sample"}, batch_samples=32, save_every=100)
    assert (after_save["epoch"], after_save["phase"], after_save["batches_in_epoch"]) == (3, "train", 0)
