"""The wandb logger, saver and loader with wandb in offline mode, and auto-resume across two processes."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dalle2_decoder.config import TrackerConfig, WandbLoadConfig, WandbLogConfig, WandbSaveConfig
from dalle2_decoder.tracking import create_tracker, read_file, read_run_state

from .tracking_servers import wandb_config, wandb_history, wandb_records, wandb_run_dirs

SECRET = "0123456789abcdef0123456789abcdef01234567"  # shaped like a wandb API key
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    folder = tmp_path / "wandb-dir"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)
    return folder


@pytest.mark.slow
def test_offline_run_holds_metrics_images_config_and_saved_files(tmp_path, wandb_dir, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)  # a secret known from the environment, masked wherever it appears
    log = WandbLogConfig(log_type="wandb", wandb_entity="team", wandb_project="decoder", wandb_run_name="first try")
    saves = [
        WandbSaveConfig(save_to="wandb", save_latest_to="checkpoints/latest.pt", save_meta_to="meta"),
        WandbSaveConfig(save_to="wandb", save_latest_to="decoder.safetensors", save_type="model"),
    ]
    full_config = {"seed": 5, "secrets": {"wandb_api_key": SECRET}, "note": f"see {SECRET}"}
    config = TrackerConfig(log=log, save=saves, data_path=str(tmp_path / "run"))
    tracker = create_tracker(config, full_config_dict=full_config, is_main_process=True)
    tracker.log({"loss/unet1": 0.5, "lr": 1e-4}, step=1)
    tracker.log({"loss/unet1": 0.25}, step=2)
    tracker.log_images("samples/test", torch.rand(2, 3, 8, 8), ["a red cube", "a blue ball"], step=2)
    tracker.save(step=2, checkpoint_state={"samples_seen": 2, "w": torch.ones(3)}, model_state={"w": torch.ones(3)})
    run_id = tracker.run_id
    tracker.finish()

    (run_dir,) = wandb_run_dirs(wandb_dir, run_id)
    history = wandb_history(run_dir)
    assert [row["loss/unet1"] for row in history if "loss/unet1" in row] == [0.5, 0.25]
    image_row = next(row for row in history if "samples/test.captions" in row)
    assert image_row["samples/test.captions"] == ["a red cube", "a blue ball"] and image_row["_step"] == 2
    assert len(list((run_dir / "files" / "media" / "images").rglob("*.png"))) == 2

    recorded_config = wandb_config(run_dir)
    assert recorded_config["seed"] == 5
    assert SECRET not in json.dumps(recorded_config)
    run_record = next(record for kind, record in wandb_records(run_dir) if kind == "run")
    assert run_record.entity == "team" and run_record.project == "decoder" and run_record.display_name == "first try"

    files = run_dir / "files"
    assert read_file(files / "checkpoints" / "latest.pt").state["samples_seen"] == 2
    assert torch.equal(read_file(files / "decoder.safetensors").model_state["w"], torch.ones(3))
    assert SECRET not in (files / "meta" / "config.json").read_text()
    published = {file.path for kind, record in wandb_records(run_dir) if kind == "files" for file in record.files}
    assert {"checkpoints/latest.pt", "decoder.safetensors", "meta/config.json"} <= published
    assert read_run_state(tmp_path / "run").wandb_run_path == f"team/decoder/{run_id}"

    # resuming that run by id: same wandb run, and the wandb loader finds the file the run saved
    resume = WandbLogConfig(
        log_type="wandb", wandb_entity="team", wandb_project="decoder", wandb_run_id=run_id, resume=True
    )
    config = TrackerConfig(
        log=resume,
        save=[],
        data_path=str(tmp_path / "run2"),
        load=WandbLoadConfig(load_from="wandb", wandb_file_path="checkpoints/latest.pt"),
    )
    tracker = create_tracker(config, full_config_dict={}, is_main_process=True)
    loaded = tracker.load()
    assert tracker.run_id == run_id
    assert loaded.state["samples_seen"] == 2 and "checkpoints/latest.pt" in loaded.source
    tracker.finish()
    assert len(wandb_run_dirs(wandb_dir, run_id)) == 2

    # a file the run does not have is a clear error
    config = TrackerConfig(
        log=resume,
        save=[],
        data_path=str(tmp_path / "run3"),
        load=WandbLoadConfig(load_from="wandb", wandb_file_path="nope.pt", wandb_run_path=f"team/decoder/{run_id}"),
    )
    tracker = create_tracker(config, full_config_dict={}, is_main_process=True)
    with pytest.raises(Exception, match="wandb is offline and nope.pt of run .* is not in a local run folder"):
        tracker.load()
    tracker.finish()


TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from dalle2_decoder.config import LocalSaveConfig, TrackerConfig, WandbLoadConfig, WandbLogConfig, WandbSaveConfig
    from dalle2_decoder.tracking import create_tracker

    data_path, interrupt = sys.argv[1], sys.argv[2] == "interrupt"
    config = TrackerConfig(
        log=WandbLogConfig(log_type="wandb", wandb_entity="team", wandb_project="decoder", auto_resume=True),
        save=[LocalSaveConfig(save_to="local", save_latest_to="latest.pt"),
              WandbSaveConfig(save_to="wandb", save_latest_to="latest.pt")],
        load=WandbLoadConfig(load_from="wandb", wandb_file_path="latest.pt", only_auto_resume=True),
        data_path=data_path,
    )
    with create_tracker(config, full_config_dict={"seed": 0}, is_main_process=True) as tracker:
        loaded = tracker.load()
        start = loaded.state["samples_seen"] if loaded else 0
        print("RESULT " + json.dumps({"run_id": tracker.run_id, "start": start,
                                      "auto_resumed": bool(loaded and loaded.auto_resumed)}), flush=True)
        for step in (start + 1, start + 2):
            tracker.log({"loss": 1.0 / step}, step=step)
        tracker.save(step=start + 2, checkpoint_state={"samples_seen": start + 2})
        if interrupt:
            raise KeyboardInterrupt("simulated preemption after the save")
    """
)


def run_training(script: Path, data_path: Path, mode: str):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.run(
        [sys.executable, str(script), str(data_path), mode], capture_output=True, text=True, env=env, timeout=600
    )
    results = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    assert results, process.stdout + process.stderr
    return process, json.loads(results[-1][len("RESULT ") :])


@pytest.mark.slow
def test_auto_resume_across_two_processes(tmp_path, wandb_dir):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    data_path = tmp_path / "run"

    first, first_result = run_training(script, data_path, "interrupt")
    assert first.returncode != 0 and "simulated preemption" in first.stderr
    assert first_result["start"] == 0 and not first_result["auto_resumed"]
    state = read_run_state(data_path)
    assert not state.finished and state.step == 2 and state.latest_checkpoint == str(data_path / "latest.pt")

    second, second_result = run_training(script, data_path, "finish")
    assert second.returncode == 0, second.stderr
    assert second_result == {"run_id": first_result["run_id"], "start": 2, "auto_resumed": True}
    state = read_run_state(data_path)
    assert state.finished and state.attempts == 2 and state.step == 4
    assert read_file(data_path / "latest.pt").state["samples_seen"] == 4

    first_dir, second_dir = wandb_run_dirs(wandb_dir, first_result["run_id"])  # one wandb run, two processes
    assert [row["loss"] for row in wandb_history(first_dir)] == [1.0, 0.5]
    assert [row["_step"] for row in wandb_history(second_dir)] == [3, 4]
    resumed_run = next(record for kind, record in wandb_records(second_dir) if kind == "run")
    assert resumed_run.run_id == first_result["run_id"]
    assert read_file(second_dir / "files" / "latest.pt").state["samples_seen"] == 4

    # the finished run is not resumed again: the data path is now refused
    third = subprocess.run(
        [sys.executable, str(script), str(data_path), "finish"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=600,
    )
    assert third.returncode != 0 and "holds the finished run" in third.stderr
