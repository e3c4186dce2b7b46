"""Checkpoint and model files: atomic writes, weights-only reads, strict loading, RNG states."""

import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from dalle2_decoder.common.files import atomic_write
from dalle2_decoder.loading import load_model_weights
from dalle2_decoder.tracking import (
    CheckpointError,
    CheckpointMismatchError,
    capture_rng_state,
    load_state_dict_checked,
    read_file,
    restore_rng_state,
    save_checkpoint,
    save_model,
)
from dalle2_decoder.tracking.checkpoint import check_weights_only


class TinyNet(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.proj = nn.Linear(3, width)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("steps", torch.zeros(1))


def trainer_like_state(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.proj.weight.sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizers": [optimizer.state_dict()],
        "samples_seen": 1234,
        "rng": capture_rng_state(),
        "config": json.dumps({"a": 1}),
    }


def test_checkpoint_round_trip_is_weights_only_loadable(tmp_path):
    model = TinyNet()
    state = trainer_like_state(model)
    path = save_checkpoint(tmp_path / "ck.pt", state, step=7, config_json='{"seed": 1}')

    raw = torch.load(path, weights_only=True)  # the strict loader accepts everything in it
    assert raw["format"] == "dalle2_decoder.checkpoint/1"
    loaded = read_file(path)
    assert loaded.kind == "checkpoint" and loaded.step == 7 and loaded.config_json == '{"seed": 1}'
    assert loaded.state["samples_seen"] == 1234
    assert torch.equal(loaded.state["model"]["proj.weight"], model.state_dict()["proj.weight"])
    optimizer = torch.optim.AdamW(TinyNet().parameters(), lr=1e-3)
    optimizer.load_state_dict(loaded.state["optimizers"][0])
    assert [name for name in os.listdir(tmp_path)] == ["ck.pt"]  # no temporary file left behind


def test_objects_weights_only_loading_would_refuse_are_rejected_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint_state\['extra'\]\['rng'\] is a numpy.ndarray"):
        save_checkpoint(tmp_path / "ck.pt", {"extra": {"rng": np.zeros(3)}}, step=0)
    assert not (tmp_path / "ck.pt").exists()
    check_weights_only({"a": [1, 2.0, "x", None, (torch.zeros(1), True)]})


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "latest.pt"
    target.write_bytes(b"previous")

    def broken_write(temp):
        temp.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken_write)
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["latest.pt"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_files_with_arbitrary_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "dalle2_decoder.checkpoint/1", "state": _Exploit()}, path)
    with pytest.raises(CheckpointError, match=r"unsupported GLOBAL posix.system.*could run arbitrary code"):
        read_file(path)


def _bad_files(tmp_path):
    """(file, what the one-line message must say) for each kind of file that is not a usable checkpoint."""
    (tmp_path / "text.pth").write_text("hello, this is not a checkpoint\n")  # torch says KeyError: 104
    (tmp_path / "binary.pth").write_bytes(bytes(range(256)))
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"format": "dalle2_decoder.checkpoint/1", "step": 3}, tmp_path / "no_state.pth")
    torch.save({"format": "dalle2_decoder.checkpoint/1", "state": {"progress": {}}}, tmp_path / "no_trainer.pth")
    torch.save({"format": "dalle2_decoder.model/1", "step": 3}, tmp_path / "no_model.pth")
    torch.save({"format": "dalle2_decoder.checkpoint/9", "state": {}}, tmp_path / "future.pth")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    torch.save({}, tmp_path / "empty_dict.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with open(tmp_path / "truncated.pth", "wb") as handle:
        data = tmp_path / "full.pth"
        torch.save({"format": "dalle2_decoder.model/1", "model": {"w": torch.zeros(1000)}}, data)
        handle.write(data.read_bytes()[:500])
    (tmp_path / "folder").mkdir()
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    return [
        ("text.pth", "not a PyTorch checkpoint file"),
        ("binary.pth", "not a PyTorch checkpoint file"),
        ("empty.pth", "the file is empty (0 bytes)"),
        ("no_state.pth", "checkpoint without its 'state' entry"),
        ("no_model.pth", "model save without its 'model' weights"),
        ("future.pth", "format 'dalle2_decoder.checkpoint/9' is not one this version reads"),
        ("other.pt", "format 'something-else' is not one this version reads"),
        ("empty_dict.pt", "holds an empty dictionary"),
        ("list.pt", "a list; neither a checkpoint"),
        ("truncated.pth", "not a readable checkpoint or model file"),
        ("folder", "is a folder, not a checkpoint file"),
        ("nope.pt", "checkpoint file not found"),
        ("bad.safetensors", "not a readable safetensors file"),
    ]


def test_files_that_are_not_checkpoints_give_one_line_naming_the_file_and_the_problem(tmp_path):
    for name, says in _bad_files(tmp_path):
        with pytest.raises(CheckpointError) as error:
            read_file(tmp_path / name)
        message = str(error.value)
        assert says in message, (name, message)
        assert str(tmp_path / name) in message and "\n" not in message, (name, message)
        # load_model_weights (the evaluation command's and users' entry point) says the same.
        with pytest.raises(CheckpointError) as error:
            load_model_weights(TinyNet(), tmp_path / name)
        assert says in str(error.value), name


def test_a_checkpoint_without_the_run_state_is_named_when_training_would_use_it(tmp_path):
    from dalle2_decoder.training.state import TrainingState

    torch.save({"format": "dalle2_decoder.checkpoint/1", "state": {"progress": {}}}, tmp_path / "no_trainer.pth")
    torch.save(
        {"format": "dalle2_decoder.checkpoint/1", "state": {"trainer": {"decoder": {}}}}, tmp_path / "no_progress.pth"
    )
    for name, says in (
        ("no_trainer.pth", "without its trainer state"),
        ("no_progress.pth", "without its 'progress' entry"),
    ):
        loaded = read_file(tmp_path / name)
        with pytest.raises(CheckpointError) as error:
            TrainingState.from_checkpoint(loaded)
        assert says in str(error.value) and name in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_model_save_round_trip_with_config(tmp_path, name):
    source = TinyNet()
    path = save_model(tmp_path / name, source.state_dict(), step=3, config_json='{"decoder": {}}')
    target = TinyNet()
    loaded = load_model_weights(target, path)
    assert loaded.kind == "model" and loaded.step == 3 and loaded.config_json == '{"decoder": {}}'
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_safetensors_save_copies_tensors_that_share_storage(tmp_path):
    weight = torch.randn(4, 4)
    path = save_model(tmp_path / "tied.safetensors", {"a": weight, "b": weight}, step=0)
    loaded = read_file(path)
    assert torch.equal(loaded.model_state["a"], loaded.model_state["b"])


def test_mismatched_weights_name_every_bad_tensor(tmp_path):
    state = TinyNet(width=4).state_dict()
    state["extra.bias"] = torch.zeros(2)
    del state["norm.bias"]
    path = save_model(tmp_path / "model.safetensors", state, step=0)
    target = TinyNet(width=8)
    before = target.proj.weight.clone()
    with pytest.raises(CheckpointMismatchError) as error:
        load_model_weights(target, path)
    message = str(error.value)
    assert "proj.weight (4, 3) vs (8, 3)" in message and "norm.weight (4,) vs (8,)" in message
    assert "missing from the checkpoint (1): norm.bias" in message
    assert "not in the model (1): extra.bias" in message
    assert error.value.missing == ["norm.bias"] and error.value.unexpected == ["extra.bias"]
    assert torch.equal(target.proj.weight, before)  # nothing was half-loaded


def test_a_checkpoint_is_not_taken_for_a_model_save(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", {"model": TinyNet().state_dict()}, step=0)
    with pytest.raises(CheckpointError, match="is a training checkpoint, not a model save"):
        load_model_weights(TinyNet(), path)


def test_plain_state_dicts_load_with_checks():
    model = TinyNet()
    load_state_dict_checked(model, TinyNet().state_dict())
    with pytest.raises(CheckpointMismatchError, match="steps"):
        load_state_dict_checked(model, {k: v for k, v in TinyNet().state_dict().items() if k != "steps"})


def test_rng_states_survive_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    save_checkpoint(tmp_path / "ck.pt", {"rng": capture_rng_state()}, step=0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    restore_rng_state(read_file(tmp_path / "ck.pt").state["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_save_paths_fill_in_the_reference_trackers_fields(tmp_path):
    from dalle2_decoder.config import ConsoleLogConfig, LocalSaveConfig, TrackerConfig
    from dalle2_decoder.tracking import create_tracker, read_run_state

    config = TrackerConfig(
        log=ConsoleLogConfig(log_type="console", auto_resume=True),
        save=[
            LocalSaveConfig(
                save_to="local",
                save_latest_to="ckpt_{epoch:02d}_{sample}_{samples_seen}.pth",
                save_best_to="best_{next_task}.pth",
            ),
            LocalSaveConfig(save_to="local", save_latest_to="model_{epoch}.pt", save_type="model"),
        ],
        data_path=str(tmp_path / "run"),
    )
    tracker = create_tracker(config, full_config_dict={}, is_main_process=True)
    state = {"trainer": {"decoder": {"w": torch.ones(1)}}, "progress": {}}
    tracker.save(
        step=96,
        checkpoint_state=state,
        model_state={"w": torch.ones(1)},
        is_best=True,
        fields={"epoch": 3, "sample": 32, "next_task": "sample", "validation_losses": [0.5]},
    )
    tracker.save(step=128, checkpoint_state=state, model_state={"w": torch.ones(1)}, fields={"epoch": 4})
    tracker.finish()
    run = tmp_path / "run"
    for name in ("ckpt_03_32_96.pth", "best_sample.pth", "model_3.pt", "ckpt_04_0_128.pth", "model_4.pt"):
        assert (run / name).is_file(), name
    # Auto-resume follows the file the latest save actually went to.
    assert read_run_state(run).latest_checkpoint == str(run / "ckpt_04_0_128.pth")


def test_unknown_save_path_fields_are_config_errors(config_problems, minimal_config):
    minimal_config["tracker"]["save"] = {
        "save_to": "local",
        "save_latest_to": "latest_{epoc}.pth",
        "save_best_to": "best_{epoch.pth",
    }
    problems = config_problems(minimal_config)
    assert any(p.startswith("tracker.save[0].save_latest_to: unknown field {epoc}") for p in problems), problems
    assert any(
        p.startswith("tracker.save[0].save_best_to: 'best_{epoch.pth' is not a valid path template") for p in problems
    ), problems
    minimal_config["tracker"]["save"] = {"save_to": "local", "save_latest_to": "latest_{epoch:03d}_{{x}}.pth"}
    assert config_problems(minimal_config) == []
