"""DALLE2-pytorch 1.15.6 checkpoints (written by its own trainer and tracker, see
scripts/reference_fixtures/checkpoint_cases.py): they load weights-only, sample like the
reference, continue training here, fine-tune an upsampler end to end, and convert."""

import io
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from dalle2_decoder.config import TrainDecoderConfig
from dalle2_decoder.failures import EXIT_CHECKPOINT
from dalle2_decoder.loading import load_model_weights
from dalle2_decoder.tracking import CheckpointFormatError, read_file
from dalle2_decoder.tracking.reference import version_metadata_allowed
from dalle2_decoder.training.trainer import DecoderTrainer

from .conftest import REPO_ROOT
from .decoder_parity import REAL, allowed_ulps
from .numerics import assert_close_to_scale

FIXTURES = Path(__file__).parent / "fixtures" / "reference" / "checkpoints"
pytestmark = pytest.mark.usefixtures("compute_threads")  # tiny models: a second thread only adds hand-offs


def raw_config(**train):
    raw = json.loads((FIXTURES / "config.json").read_text())
    raw["train"].update(train)
    return raw


def config(**train) -> TrainDecoderConfig:
    return TrainDecoderConfig.from_dict(raw_config(**train))


def reference_payload(name: str):
    with version_metadata_allowed():
        return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


def reference_param_names(model_state, index: int, groups):
    """The reference optimizer's parameter numbering, worked out independently: U-Net entries in
    order, split into tensors of 2+ dimensions, then the rest (get_optimizer's grouping)."""
    prefix = f"unets.{index}."
    names = [n[len(prefix) :] for n in model_state if n.startswith(prefix)]
    ordered = [n for n in names if model_state[prefix + n].ndim >= 2] + [
        n for n in names if model_state[prefix + n].ndim < 2
    ]
    numbers = [i for group in groups for i in group["params"]]
    return dict(zip(numbers, ordered))


@pytest.mark.parametrize("name", ["model.pth", "checkpoint.pth"])
def test_samples_for_the_same_noise_equal_the_references(name):
    samples = load_file(FIXTURES / "samples.safetensors")
    noise = [samples[f"noise.{i}"] for i in range(sum(k.startswith("noise.") for k in samples))]
    decoder = config().decoder.create()
    loaded = load_model_weights(decoder, FIXTURES / name)  # the checkpoint gives its EMA weights, as trainer.sample
    assert loaded.origin == "dalle2-pytorch"
    decoder.eval()
    images = decoder.sample(samples["image_embed"], cond_scale=1.0, noise=noise)
    assert images.shape == samples["images"].shape
    # the reference's images from its U-Nets, as in the decoder parity fixtures (tests/decoder_parity.py)
    bound = allowed_ulps("sampled images" + REAL)
    assert_close_to_scale(images, samples["images"], ulps_of_scale=bound, what=f"{name} samples")


def _pickle_with(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_weights_only_loading_allows_the_version_object_and_nothing_more(tmp_path):
    from packaging.version import Version

    assert type(reference_payload("model.pth")["version"]) is Version  # the files really hold one
    weights = {"unets.0.w": torch.zeros(2, 2)}
    (tmp_path / "version.pth").write_bytes(_pickle_with({"model": weights, "version": Version("1.15.6")}))
    assert read_file(tmp_path / "version.pth").model_state.keys() == weights.keys()
    # Any other object is refused, also next to a version, and without running its code.
    import argparse

    (tmp_path / "other.pth").write_bytes(
        _pickle_with({"model": weights, "version": Version("1.0"), "args": argparse.Namespace(a=1)})
    )
    with pytest.raises(CheckpointFormatError) as error:
        read_file(tmp_path / "other.pth")
    assert "other.pth" in str(error.value) and "weights-only" in str(error.value) and "\n" not in str(error.value)
    # The permission is scoped to the load.
    assert Version not in torch.serialization.get_safe_globals()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "version.pth", weights_only=True)


def test_a_version_pickled_by_packaging_before_26_loads(tmp_path, monkeypatch):
    """Files written with older `packaging` pickle Version's __dict__: a `_Version` record and Infinity sentinels."""
    import copyreg

    from packaging import _structures, version

    if not hasattr(version, "_Version"):
        pytest.skip("this packaging has no _Version to write an old-style pickle with")

    def old_style(self, protocol):
        state = {
            "_version": version._Version(epoch=0, release=(1, 15, 6), dev=None, pre=None, post=None, local=None),
            "_key": (
                0,
                (1, 15, 6),
                _structures.Infinity,
                _structures.NegativeInfinity,
                _structures.Infinity,
                _structures.NegativeInfinity,
            ),
        }
        return copyreg.__newobj__, (version.Version,), state

    monkeypatch.setattr(version.Version, "__reduce_ex__", old_style)
    (tmp_path / "old.pth").write_bytes(
        _pickle_with({"model": {"unets.0.w": torch.ones(1)}, "version": version.Version("1.15.6")})
    )
    monkeypatch.undo()
    loaded = read_file(tmp_path / "old.pth")
    assert loaded.origin == "dalle2-pytorch" and torch.equal(loaded.model_state["unets.0.w"], torch.ones(1))


def test_a_reference_checkpoint_continues_training_here():
    payload = reference_payload("checkpoint.pth")
    meta = json.loads((FIXTURES / "meta.json").read_text())
    cfg = config()
    trainer = DecoderTrainer(cfg.decoder.create(), Accelerator(cpu=True), cfg.train)
    loaded = read_file(FIXTURES / "checkpoint.pth")
    notes = trainer.load_state_dict(loaded.state["trainer"])
    assert not [n for n in notes if "optimizer" in n], notes  # the optimizer state mapped for both U-Nets
    assert trainer.step == max(meta["steps"]) == 3
    for number in (1, 2):
        index = number - 1
        unet = trainer.decoder.unets[index]
        params = dict(unet.named_parameters())
        # Weights, EMA average and EMA count are the reference's.
        for name, tensor in params.items():
            assert torch.equal(tensor.detach(), payload["model"][f"unets.{index}.{name}"]), name
        ema = trainer.emas[number]
        assert int(ema.num_updates) == meta["ema_steps"][index]
        for name, tensor in ema.averaged.named_parameters():
            assert torch.equal(tensor, payload["ema"][f"{index}.ema_model.{name}"]), name
        # Adam moments sit on the same parameters as in the reference's optimizer.
        saved = payload[f"optim{index}"]
        numbering = reference_param_names(payload["model"], index, saved["param_groups"])
        optimizer = trainer.optimizers[number]
        assert len(saved["state"]) > 100
        for number_in_ref, entry in saved["state"].items():
            state = optimizer.state[params[numbering[number_in_ref]]]
            assert torch.equal(state["exp_avg"], entry["exp_avg"]) and torch.equal(
                state["exp_avg_sq"], entry["exp_avg_sq"]
            )
            assert float(state["step"]) == float(entry["step"]) == 3
        assert trainer.schedulers[number].last_epoch == 3 and trainer.unet_lr(number) == pytest.approx(1e-3)
    # The steps go on from there.
    generator = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(2, 3, 16, 16, generator=generator),
        "image_embed": torch.randn(2, 32, generator=generator),
    }
    trainer.train_step(batch)
    assert trainer.step == 4 and int(trainer.emas[1].num_updates) == 4
    first = next(
        p for p in trainer.decoder.unets[0].parameters() if p.grad is None and p in trainer.optimizers[1].state
    )
    assert float(trainer.optimizers[1].state[first]["step"]) == 4


def test_an_upsampler_checkpoint_fine_tunes_the_upsampler_and_says_what_it_lacks():
    cfg = config(unet_training_mask=[False, True], lr=[0.0, 3e-5])
    trainer = DecoderTrainer(cfg.decoder.create(), Accelerator(cpu=True), cfg.train)
    before = {k: v.clone() for k, v in trainer.decoder.unets[0].state_dict().items()}
    notes = trainer.load_state_dict(read_file(FIXTURES / "upsampler_checkpoint.pth").state["trainer"])
    assert any(n.startswith("U-Net 1: not in the checkpoint") for n in notes), notes
    assert all(torch.equal(before[k], v) for k, v in trainer.decoder.unets[0].state_dict().items())
    assert trainer.step == 3 and trainer.unet_lr(2) == pytest.approx(3e-5)  # the config's rate, applied


@pytest.mark.slow
def test_convert_writes_our_model_save_from_reference_files(tmp_path):
    payload = reference_payload("checkpoint.pth")
    out = tmp_path / "decoder.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "dalle2_decoder.convert", str(FIXTURES / "checkpoint.pth"), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "EMA weights" in done.stdout
    converted = read_file(out)
    assert converted.kind == "model" and converted.step == 3 and converted.origin == "dalle2_decoder"
    decoder = TrainDecoderConfig.from_dict(json.loads(converted.config_json)).decoder.create()  # its config is ours
    load_model_weights(decoder, out)
    for index in (0, 1):
        for name, tensor in decoder.unets[index].state_dict().items():
            assert torch.equal(tensor, payload["ema"][f"{index}.ema_model.{name}"]), name
    # A model file converts to the same weights it holds; a checkpoint lacking a U-Net is refused in one line.
    from dalle2_decoder.convert import main

    assert main([str(FIXTURES / "model.pth"), str(tmp_path / "m.safetensors")]) == 0
    model = reference_payload("model.pth")["model"]
    for name, tensor in read_file(tmp_path / "m.safetensors").model_state.items():
        assert torch.equal(tensor, model[name]), name
    assert main([str(FIXTURES / "upsampler_checkpoint.pth"), str(tmp_path / "u.safetensors")]) == EXIT_CHECKPOINT
    assert not (tmp_path / "u.safetensors").exists()
    setup = (REPO_ROOT / "setup.cfg").read_text()
    assert "dalle2-convert-checkpoint = dalle2_decoder.convert:main" in setup


def test_fine_tuning_from_a_reference_checkpoint_end_to_end(tmp_path, capsys):
    """An upsampler_finetune.json-style run: tracker.load names the reference's checkpoint, U-Net 1 frozen."""
    # (the compute_threads fixture sets OMP_NUM_THREADS: the loop keeps the test's threads)
    from dalle2_decoder.data.demo import generate_demo_dataset
    from dalle2_decoder.training import main

    data = generate_demo_dataset(str(tmp_path / "demo"), num_images=48, image_size=16, embed_dim=32, shard_size=12)
    raw = raw_config(
        epochs=2,
        unet_training_mask=[False, True],
        lr=[0.0, 3e-5],
        epoch_samples=8,
        validation_samples=4,
        n_sample_images=2,
        save_every_n_samples=1000,
    )
    raw["data"] = {
        **data,
        "num_workers": 0,
        "batch_size": 4,
        "start_shard": 0,
        "end_shard": 3,
        "splits": {"train": 0.5, "val": 0.25, "test": 0.25},
    }
    raw["tracker"] = {
        "data_path": str(tmp_path / "run"),
        "log": {"log_type": "console"},
        "load": {"load_from": "local", "file_path": str(FIXTURES / "checkpoint.pth")},
        "save": [{"save_to": "local", "save_latest_to": "latest_{epoch}.pth"}],
    }
    assert main(TrainDecoderConfig.from_dict(raw)) == 0
    out = capsys.readouterr().out
    assert "(a DALLE2-pytorch checkpoint): epoch 1, 12 samples seen, step 3" in out
    assert "train.epochs: 1 -> 2: applied" in out and "train.lr: 0.001 -> [0.0, 3e-05]: applied" in out
    assert "note: U-Net(s) 1: frozen now (train.unet_training_mask)" in out
    latest = read_file(tmp_path / "run" / "latest_1.pth")
    assert (tmp_path / "run" / "latest_0.pth").is_file()  # one file per epoch: {epoch} filled in
    trainer = latest.state["trainer"]
    # The reference's epoch 1 (from 0) had seen 12 samples, more than epoch_samples: it is done;
    # epoch 2 takes 2 steps after the reference's 3.
    assert trainer["counters"]["step"] == 3 + 2
    reference = reference_payload("checkpoint.pth")["model"]
    for name, tensor in trainer["decoder"].items():
        if name.startswith("unets.0."):
            assert torch.equal(tensor, reference[name]), name  # the frozen U-Net is the reference's


def test_tracker_load_takes_reference_checkpoints_from_a_url_and_from_a_wandb_run(tmp_path):
    import shutil

    from dalle2_decoder.config import ConsoleLogConfig, TrackerConfig, UrlLoadConfig, WandbLoadConfig
    from dalle2_decoder.tracking import create_tracker
    from dalle2_decoder.tracking.loaders import WandbLoader

    from .tracking_servers import FileServer

    cfg = config()
    with FileServer(FIXTURES) as server:
        tracker = create_tracker(
            TrackerConfig(
                log=ConsoleLogConfig(log_type="console"),
                save=[],
                data_path=str(tmp_path / "run"),
                load=UrlLoadConfig(load_from="url", url=f"{server.url}/checkpoint.pth"),
            ),
            full_config_dict={},
            is_main_process=True,
        )
        loaded = tracker.load()
        tracker.finish()
    assert loaded.kind == "checkpoint" and loaded.origin == "dalle2-pytorch" and loaded.step == 3
    trainer = DecoderTrainer(cfg.decoder.create(), Accelerator(cpu=True), cfg.train)
    trainer.load_state_dict(loaded.state["trainer"])
    assert trainer.step == 3

    # A wandb run's files, as an offline run keeps them (the loader reads a local copy first).
    files = tmp_path / "wandb" / "offline-run-20260101_000000-abc123" / "files"
    files.mkdir(parents=True)
    shutil.copy(FIXTURES / "model.pth", files / "model.pth")
    loader = WandbLoader(
        WandbLoadConfig(load_from="wandb", wandb_file_path="model.pth", wandb_run_path="team/proj/abc123"),
        run_path=None,
        wandb_roots=[tmp_path / "wandb"],
        offline=True,
        download_dir=tmp_path / "dl",
    )
    loaded = read_file(loader.fetch())
    assert loaded.kind == "model" and loaded.origin == "dalle2-pytorch"
    decoder = cfg.decoder.create()
    decoder.load_state_dict(loaded.model_state)
    # A restart of the same run within the same second: wandb's folder gets a `-1` suffix, and its
    # (newer) copy is the one loaded.
    restarted = tmp_path / "wandb" / "offline-run-20260101_000000-abc123-1" / "files"
    restarted.mkdir(parents=True)
    shutil.copy(FIXTURES / "checkpoint.pth", restarted / "model.pth")
    os.utime(restarted / "model.pth", (time.time() + 10, time.time() + 10))
    assert loader.fetch() == restarted / "model.pth"


def test_a_reference_checkpoint_in_an_all_cosine_cascade_gets_a_schedule_note():
    from dalle2_decoder.tracking.reference import schedule_note

    # Our documented default (cosine everywhere) vs the reference's code (linear for the last U-Net):
    # a reference checkpoint meeting an all-cosine cascade is told how to get the reference's rule.
    assert 'beta_schedule": null' in schedule_note(["cosine", "cosine"])
    assert schedule_note(["cosine", "linear"]) is None
    assert schedule_note(["cosine"]) is None  # one U-Net: both rules give cosine
    decoder = TrainDecoderConfig.from_dict(raw_config()).decoder.create()
    assert decoder.beta_schedules == ["cosine", "linear"]  # the fixture's explicit null is the reference's rule
