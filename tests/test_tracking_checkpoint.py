"""Checkpoint and model files: atomic writes, weights-only reads, strict loading, RNG states."""
import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from dalle2_decoder.tracking import (
    CheckpointError,
    CheckpointMismatchError,
    capture_rng_state,
    load_model_weights,
    load_state_dict_checked,
    read_file,
    restore_rng_state,
    save_checkpoint,
    save_model,
)
from dalle2_decoder.tracking.checkpoint import atomic_write, check_weights_only


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


def test_missing_and_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        read_file(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt could not be loaded with weights-only loading"):
        read_file(tmp_path / "junk.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither a checkpoint nor a model save"):
        read_file(tmp_path / "other.pt")


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
