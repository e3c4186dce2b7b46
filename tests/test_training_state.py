"""What a checkpoint holds (dalle2_decoder/training/state.py): written for saving, checked on reading."""

import hashlib
import math

import pytest
import torch

from dalle2_decoder import __version__
from dalle2_decoder.config import TrainDecoderConfig
from dalle2_decoder.tracking import CheckpointFormatError, read_file, save_checkpoint
from dalle2_decoder.training.state import (
    Phase,
    Progress,
    TrainingState,
    checkpoint_payload,
    checkpoint_weights,
    has_ema_weights,
)


def tiny_config(**train) -> TrainDecoderConfig:
    return TrainDecoderConfig.from_dict(
        {
            "decoder": {"unets": [{"dim": 8, "image_embed_dim": 8}], "image_sizes": [16]},
            "data": {"webdataset_base_url": "/tmp/x/{}.tar", "num_workers": 0},
            "train": {"device": "cpu", **train},
            "tracker": {"log": {"log_type": "console"}, "save": {"save_to": "local", "save_latest_to": "x.pth"}},
        }
    )


def trainer_state(emas: bool = True):
    state = {
        "decoder": {"unets.0.w": torch.zeros(2), "unets.1.w": torch.zeros(3)},
        "optimizers": {},
        "counters": {"step": 4},
    }
    if emas:
        state["emas"] = {"2": {"averaged.w": torch.ones(3), "step": torch.tensor(4)}}
    return state


def test_a_checkpoint_saved_before_the_phase_enum_loads(tmp_path):
    """The state exactly as the loop wrote it with a string phase ('end', before the end-of-epoch phases
    were told apart): resumes as the enum's member for the first of them."""
    state = {
        "trainer": trainer_state(),
        "progress": {
            "epoch": 2,
            "batches_in_epoch": 0,
            "phase": "end",
            "samples_seen": 96,
            "next_save_at": 128,
            "best_val_loss": 0.5,
            "validation_losses": [0.7, 0.5],
        },
        "rng": [{"torch": torch.get_rng_state()}],
        "config_digest": "0" * 64,
        "package_version": "0.1.0",
    }
    save_checkpoint(tmp_path / "old.pth", state, step=96)
    loaded = TrainingState.from_checkpoint(read_file(tmp_path / "old.pth"))
    # "end" (all of the epoch's end-of-epoch phases still to do) is now told apart: validation first
    assert loaded.progress.phase is Phase.VALIDATE
    assert loaded.progress == Progress(2, 0, Phase.VALIDATE, 96, 128, 0.5, [0.7, 0.5])
    assert not loaded.progress.mid_epoch
    assert loaded.config_digest == "0" * 64 and loaded.package_version == "0.1.0" and len(loaded.rng) == 1
    assert loaded.trainer["counters"] == {"step": 4}


def test_the_payload_saves_weights_only_and_reads_back(tmp_path):
    config = tiny_config()
    progress = Progress(epoch=1, batches_in_epoch=3, samples_seen=40, next_save_at=64)
    payload = checkpoint_payload(trainer_state(), progress, [{"torch": torch.get_rng_state()}], config)
    assert set(payload) == {"trainer", "progress", "rng", "config_digest", "package_version"}
    assert payload["progress"]["phase"] == "train" and type(payload["progress"]["phase"]) is str
    assert payload["package_version"] == __version__
    assert payload["config_digest"] == hashlib.sha256(config.to_json(indent=None).encode()).hexdigest()
    assert payload["config_digest"] != checkpoint_payload({}, progress, [], tiny_config(lr=3e-4))["config_digest"]
    save_checkpoint(tmp_path / "c.pth", payload, step=40)  # refuses anything weights-only loading would
    torch.load(tmp_path / "c.pth", weights_only=True)
    state = TrainingState.from_checkpoint(read_file(tmp_path / "c.pth"))
    assert state.progress == progress and state.progress.mid_epoch and state.progress.best_val_loss == math.inf
    assert state.reference is None


@pytest.mark.parametrize(
    "state, says",
    [
        ({"progress": {}}, "without its trainer state"),
        ({"trainer": {"decoder": {}}}, "without its 'progress' entry"),
        ({"trainer": {"decoder": {}}, "progress": {"phase": "polish"}}, "'progress' entry does not load"),
        ({"trainer": {"decoder": {}}, "progress": {}, "rng": {"torch": 1}}, "'rng' entry is not one"),
        ({"trainer": {"decoder": {}, "emas": [1]}, "progress": {}}, "EMA states"),
    ],
    ids=["no-trainer", "no-progress", "unknown-phase", "rng-not-a-list", "emas-not-a-mapping"],
)
def test_a_damaged_run_state_is_named_in_one_line(tmp_path, state, says):
    save_checkpoint(tmp_path / "bad.pth", state, step=1)
    with pytest.raises(CheckpointFormatError) as error:
        TrainingState.from_checkpoint(read_file(tmp_path / "bad.pth"))
    message = str(error.value)
    assert says in message and str(tmp_path / "bad.pth") in message and "\n" not in message, message


def test_the_weights_to_sample_with_are_the_ema_ones_unless_asked_otherwise(tmp_path):
    save_checkpoint(tmp_path / "c.pth", {"trainer": trainer_state(), "progress": {}}, step=1)
    loaded = read_file(tmp_path / "c.pth")
    ema = checkpoint_weights(loaded)
    assert torch.equal(ema["unets.1.w"], torch.ones(3))  # U-Net 2's average
    assert torch.equal(ema["unets.0.w"], torch.zeros(2))  # U-Net 1 has none: its trained weights
    assert set(ema) == {"unets.0.w", "unets.1.w"}  # the EMA's own counters are not weights
    assert torch.equal(checkpoint_weights(loaded, use_ema=False)["unets.1.w"], torch.zeros(3))
    assert has_ema_weights(loaded)
    save_checkpoint(tmp_path / "plain.pth", {"trainer": trainer_state(emas=False), "progress": {}}, step=1)
    assert not has_ema_weights(read_file(tmp_path / "plain.pth"))
    save_checkpoint(tmp_path / "none.pth", {"progress": {}}, step=1)
    with pytest.raises(CheckpointFormatError, match=r"none\.pth: a checkpoint without its trainer state"):
        checkpoint_weights(read_file(tmp_path / "none.pth"))
