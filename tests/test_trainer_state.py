"""The trainer's checkpoint state as a registry of stateful parts (training/stateful.py, trainer_state.py)."""

import pytest
import torch
from accelerate import Accelerator

from dalle2_decoder.config import DecoderConfig, TrainConfig, UnetConfig
from dalle2_decoder.tracking import read_file, save_checkpoint
from dalle2_decoder.training.state import TrainingState
from dalle2_decoder.training.stateful import StateRegistry
from dalle2_decoder.training.trainer import DecoderTrainer

pytestmark = pytest.mark.usefixtures("compute_threads")
TINY = {"cond_dim": 8, "num_resnet_blocks": 1, "attn_heads": 2, "attn_dim_head": 4, "init_cross_embed": False}


def make_trainer(**train_options) -> DecoderTrainer:
    torch.manual_seed(0)
    unets = [UnetConfig(dim=8, image_embed_dim=8, dim_mults=(1,), options=TINY) for _ in range(2)]
    decoder = DecoderConfig(unets=unets, image_sizes=[8, 16], timesteps=20).create()
    return DecoderTrainer(decoder, Accelerator(cpu=True), TrainConfig(device="cpu", **train_options))


class Visits:
    """A stand-in for one more piece of training state: a tensor and a count."""

    def __init__(self) -> None:
        self.visits = torch.zeros(3)
        self.count = 0

    def state_dict(self):
        return {"visits": self.visits.clone(), "count": self.count}

    def load_state_dict(self, state_dict):
        self.visits = state_dict["visits"].clone()
        self.count = int(state_dict["count"])


def through_a_file(tmp_path, trainer_state):
    save_checkpoint(tmp_path / "c.pth", {"trainer": trainer_state, "progress": {}}, step=1)
    return TrainingState.from_checkpoint(read_file(tmp_path / "c.pth")).trainer


def test_one_registration_saves_and_loads_a_new_part_through_the_checkpoint_file(tmp_path):
    trainer = make_trainer()
    part = Visits()
    trainer.parts.register("visits", part)
    part.visits += torch.tensor([1.0, 2.0, 3.0])
    part.count = 7

    saved = through_a_file(tmp_path, trainer.state_dict())

    resumed = make_trainer()
    restored = Visits()
    resumed.parts.register("visits", restored)
    resumed.load_state_dict(saved)
    assert restored.count == 7
    assert torch.equal(restored.visits, torch.tensor([1.0, 2.0, 3.0]))
    # A trainer without the part still loads the file: the entry is simply not read.
    make_trainer().load_state_dict(saved)


def test_the_trainer_state_keeps_the_checkpoint_files_keys_in_their_order():
    # The file format (tracking/checkpoint.py, training/state.py): these keys, in this order.
    keys = ["decoder", "optimizers", "emas", "schedulers", "counters", "trained_unets"]
    assert list(make_trainer().state_dict()) == keys
    with_posthoc = make_trainer(posthoc_ema_sigma_rels=[0.05, 0.1], unet_training_mask=[False, True])
    state = with_posthoc.state_dict()
    assert list(state) == keys + ["posthoc_ema"]
    assert list(state["optimizers"]) == ["2"] and state["trained_unets"] == [2]
    assert state["counters"] == {"step": 0, "micro_step": 0, "nonfinite_steps": 0, "nonfinite_streak": 0}


def test_a_part_loads_from_its_own_entry_and_a_part_without_one_is_left_alone():
    trainer = make_trainer()
    trainer.step = 5
    state = trainer.state_dict()
    fresh = make_trainer()
    fresh.load_state_dict(state)
    assert fresh.step == 5
    # An absent entry leaves a part as it is unless it was registered to load without one.
    registry = StateRegistry()
    kept, reset = Visits(), Visits()
    kept.count = reset.count = 3

    class Resets(Visits):
        def load_state_dict(self, state_dict):
            self.count = 0 if state_dict is None else int(state_dict["count"])

    reset = Resets()
    reset.count = 3
    registry.register("kept", kept)
    registry.register("reset", reset, load_absent=True)
    registry.load_state_dict({})
    assert kept.count == 3 and reset.count == 0


def test_a_part_that_saves_nothing_writes_no_entry_and_notes_come_back_in_order():
    class Nothing:
        def state_dict(self):
            return None

        def load_state_dict(self, state_dict):
            return [f"loaded {state_dict}"]

    registry = StateRegistry()
    registry.register("first", Nothing(), load_absent=True)
    registry.register("second", Nothing())
    assert registry.state_dict() == {}
    assert registry.load_state_dict({"second": 2}) == ["loaded None", "loaded 2"]


def test_registering_a_name_twice_or_an_object_without_state_is_refused():
    registry = StateRegistry()
    registry.register("visits", Visits())
    with pytest.raises(ValueError, match="'visits' is registered twice"):
        registry.register("visits", Visits())
    with pytest.raises(TypeError, match="'weights': a list has no state_dict"):
        registry.register("weights", [1, 2])


def test_the_registrys_protocol_and_torchs_stateful_accept_the_same_objects():
    """The registry states `Stateful`'s two methods itself (importing torch's loads all of
    torch.distributed.checkpoint at start-up): both accept the trainer's parts and refuse the same
    objects."""
    from torch.distributed.checkpoint.stateful import Stateful as TorchStateful

    from dalle2_decoder.training.stateful import Stateful

    class OnlySaves:
        def state_dict(self):
            return {}

    objects = [torch.nn.Linear(1, 1), torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1), OnlySaves(), {}]
    assert [isinstance(o, Stateful) for o in objects] == [isinstance(o, TorchStateful) for o in objects]
    assert [isinstance(o, Stateful) for o in objects] == [True, True, False, False]
