"""The training run end to end on a tiny demo dataset: phases, saves, resume, signals."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from dalle2_decoder.config import TrainDecoderConfig
from dalle2_decoder.failures import EXIT_STOPPED
from dalle2_decoder.tracking import read_file
from dalle2_decoder.training import TrainingRun, main

from .conftest import REPO_ROOT, cpu_launch_command
from .training_fixtures import tiny_config, write_tiny_demo


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_tiny_demo(tmp_path_factory.mktemp("demo"))


def metrics_lines(data_path):
    return [json.loads(line) for line in (data_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_every_phase_runs_and_writes_what_it_should(demo_data, tmp_path):
    data_path = tmp_path / "run"
    config = TrainDecoderConfig.from_dict(tiny_config(demo_data, data_path, epochs=2, save_every_n_samples=12))
    assert main(config) == 0
    lines = metrics_lines(data_path)
    # train: losses averaged every 10 steps are not reached with 6 steps an epoch; validation is logged per epoch.
    val = [line for line in lines if "val/loss/unet1" in json.dumps(line)]
    assert len(val) == 2
    # sample: grids of real next to generated images for train and test examples, periodic and per epoch.
    grids = sorted((data_path / "samples" / "train_examples").glob("*.png"))
    assert [p.name for p in grids] == [
        "step_000000012.png",
        "step_000000024.png",
        "step_000000036.png",
        "step_000000048.png",
    ]
    captions = json.loads(grids[0].with_suffix(".json").read_text())["captions"]
    assert len(captions) == 4 and captions[0].startswith("real: a ") and captions[1].startswith("generated: a ")
    assert (data_path / "samples" / "test_examples").is_dir()
    # save: latest and best checkpoints, the model save, metadata; counters in samples seen.
    latest = read_file(data_path / "latest.pth")
    assert latest.kind == "checkpoint" and latest.step == 48
    assert latest.state["progress"]["epoch"] == 2 and latest.state["progress"]["samples_seen"] == 48
    from dalle2_decoder import __version__

    assert latest.state["package_version"] == __version__ and latest.state["rng"]
    assert (data_path / "best.pth").is_file() and (data_path / "meta" / "config.json").is_file()
    model = read_file(data_path / "model.safetensors")
    fresh = config.decoder.create()
    fresh.load_state_dict(model.model_state)  # a model save loads into a freshly created decoder
    images = fresh.sample(image_embed=torch.randn(1, 32), seed=0)
    assert images.shape == (1, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


def _final_weights(data_path):
    return read_file(data_path / "latest.pth").state["trainer"]["decoder"]


@pytest.mark.slow
@pytest.mark.usefixtures("compute_threads")  # a fixed thread count: the runs compare bit for bit
def test_stopped_mid_epoch_then_auto_resumed_ends_with_the_same_weights(demo_data, tmp_path):
    options = dict(epochs=2, epoch_samples=32)
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
        if len(calls) == 3:  # mid-epoch: 8 batches an epoch
            os.kill(os.getpid(), signal.SIGUSR1)
        return losses

    run.trainer.train_step = step_then_signal
    assert run.execute() == EXIT_STOPPED and run.interrupted
    stopped = read_file(interrupted / "latest.pth")
    assert stopped.state["progress"]["batches_in_epoch"] == 3 and stopped.state["progress"]["epoch"] == 0

    resumed = TrainingRun(config)  # auto_resume: true in the config
    assert resumed.execute() == 0
    assert resumed.resumed
    expected, got = _final_weights(uninterrupted), _final_weights(interrupted)
    assert expected.keys() == got.keys()
    # Exactly: one process, the same kernels and thread count, and everything the steps read is in
    # the checkpoint; any difference is state that resume lost.
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_sigterm_saves_and_a_requeued_job_auto_resumes(demo_data, tmp_path, write_config):
    data_path = tmp_path / "run"
    path = write_config(tiny_config(demo_data, data_path, epochs=1000, epoch_samples=40))
    command = [sys.executable, str(REPO_ROOT / "train_decoder.py"), "--config_file", str(path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    for line in process.stdout:
        if "train/loss/unet1" in line:  # something trained: a stop now has a checkpoint to save
            break
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == EXIT_STOPPED, output
    said = re.findall(r"stopped by SIGTERM during [a-z ]+ of epoch \d+ \(\d+ samples seen\): checkpoint saved", output)
    assert len(said) == 1, output
    progress = read_file(data_path / "latest.pth").state["progress"]
    assert json.loads((data_path / "run_state.json").read_text())["finished"] is False

    # The requeued job runs the same command (told here to end after the interrupted epoch).
    requeued = subprocess.run(
        command + ["--set", f"train.epochs={progress['epoch'] + 1}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert requeued.returncode == 0, requeued.stdout + requeued.stderr
    assert f"resumed from auto-resume {data_path / 'latest.pth'}" in requeued.stdout
    assert f"{progress['batches_in_epoch'] * 4 + progress['epoch'] * 40} samples seen" in requeued.stdout
    final = read_file(data_path / "latest.pth").state["progress"]
    assert final["epoch"] == progress["epoch"] + 1 and final["samples_seen"] == (progress["epoch"] + 1) * 40
    assert json.loads((data_path / "run_state.json").read_text())["finished"] is True


@pytest.mark.slow
def test_two_process_cpu_run_with_accelerate_launch(demo_data, tmp_path, write_config):
    data_path = tmp_path / "run"
    config = tiny_config(
        demo_data, data_path, epochs=2, epoch_samples=32, validation_samples=8, save_every_n_samples=16
    )
    config["tracker"]["log"]["auto_resume"] = False
    path = write_config(config)
    # The shipped CPU multi-process accelerate config (2 processes, gloo).
    command = cpu_launch_command(str(REPO_ROOT / "train_decoder.py"), "--config_file", str(path))
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=tmp_path, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Both ranks finish, with identical parameters (the loop compares fingerprints across ranks at the end).
    assert "process 1 of 2 finished" in output and "process 2 of 2 finished" in output
    assert "parameters identical across 2 processes" in output
    assert output.count("dalle2-decoder training") == 1  # the summary is the main rank's alone
    # Only the main rank writes: every metric line and every grid exactly once. 32 samples an epoch
    # over 2 ranks of batch 4 = 4 steps an epoch, each counting 8 samples.
    lines = metrics_lines(data_path)
    val_steps = [line["samples_seen"] for line in lines if any(key.startswith("val/loss") for key in line)]
    assert val_steps == [32, 64]
    grids = sorted(p.name for p in (data_path / "samples" / "train_examples").glob("*.png"))
    assert grids == ["step_000000016.png", "step_000000032.png", "step_000000048.png", "step_000000064.png"]
    assert read_file(data_path / "latest.pth").state["progress"]["samples_seen"] == 64
    assert len(read_file(data_path / "latest.pth").state["rng"]) == 2  # every rank's RNG state is saved


@pytest.mark.slow
def test_upsampler_only_training_leaves_the_base_unet_untouched(demo_data, tmp_path):
    raw = tiny_config(demo_data, tmp_path / "run", epochs=1, epoch_samples=16, unet_training_mask=[False, True])
    base = dict(raw["decoder"]["unets"][0])
    raw["decoder"]["unets"] = [base, {**base, "dim": 8}]
    raw["decoder"]["image_sizes"] = [8, 16]
    raw["decoder"]["beta_schedule"] = "cosine"  # the default linear schedule of the last U-Net needs over 20 steps
    raw["tracker"]["save"] = [{"save_to": "local", "save_latest_to": "latest.pth"}]
    config = TrainDecoderConfig.from_dict(raw)
    torch.manual_seed(config.seed)
    initial = {k: v.clone() for k, v in config.decoder.create().state_dict().items()}

    run = TrainingRun(config)
    assert run.trainer.trained_unets == [2] and set(run.trainer.optimizers) == {2}
    assert run.execute() == 0
    saved = read_file(tmp_path / "run" / "latest.pth").state["trainer"]["decoder"]
    for name, tensor in initial.items():
        if name.startswith("unets.0."):
            assert torch.equal(saved[name], tensor), name  # the frozen base U-Net never changed
    assert any(not torch.equal(saved[name], tensor) for name, tensor in initial.items() if name.startswith("unets.1."))
    # Sample grids start at the upsampler, from the real low-resolution images, at its size.
    grid = json.loads(sorted((tmp_path / "run" / "samples" / "train_examples").glob("*.json"))[-1].read_text())
    assert len(grid["captions"]) == 4


@pytest.mark.slow
def test_a_model_save_named_in_tracker_load_starts_a_new_run_from_its_weights(demo_data, tmp_path):
    first = tmp_path / "first"
    assert main(TrainDecoderConfig.from_dict(tiny_config(demo_data, first, epochs=1, epoch_samples=8))) == 0
    model = read_file(first / "model.safetensors").model_state

    raw = tiny_config(demo_data, tmp_path / "second", epochs=1, epoch_samples=8)
    raw["tracker"]["load"] = {"load_from": "local", "file_path": str(first / "model.safetensors")}
    run = TrainingRun(TrainDecoderConfig.from_dict(raw))
    run.load_start_checkpoint()
    assert not run.resumed and run.progress.samples_seen == 0  # a new run, not a resumed one
    for name, tensor in run.trainer.decoder.state_dict().items():
        assert torch.equal(tensor, model[name]), name
    for name, tensor in run.trainer.emas[1].averaged.state_dict().items():
        assert torch.equal(tensor, model[f"unets.0.{name}"]), name  # the EMA starts from them too
    run.tracker.finish()
