"""Configs written for the reference trainer (DALLE2-pytorch's train_decoder.py) load unchanged.

`reference_format.json` has the layout and options of the reference's example decoder config.
The reference's further documented options are accepted and honoured, or accepted with a
warning where they have no effect here.
"""

from __future__ import annotations

import copy
import json
import pathlib
import warnings

import pytest

from dalle2_decoder.config import (
    ConfigWarning,
    HuggingfaceSaveConfig,
    TrainDecoderConfig,
    WandbLogConfig,
    WandbSaveConfig,
)

REFERENCE_CONFIG = pathlib.Path(__file__).with_name("reference_format.json")


@pytest.fixture
def reference_raw():
    return json.loads(REFERENCE_CONFIG.read_text())


def test_reference_example_loads_unchanged():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in it is ignored
        config = TrainDecoderConfig.from_json_path(REFERENCE_CONFIG)
    unet = config.decoder.unets[0]
    assert (unet.dim, unet.image_embed_dim, tuple(unet.dim_mults)) == (128, 768, (1, 2, 4, 8))
    assert unet.options == {"cond_dim": 64, "channels": 3, "attn_dim_head": 32, "attn_heads": 16}
    assert config.decoder.beta_schedule == ["cosine"]
    assert config.data.preprocessing["RandomResizedCrop"] == {
        "size": [128, 128],
        "scale": [0.75, 1.0],
        "ratio": [1.0, 1.0],
    }
    assert config.train.amp is False and config.train.n_sample_images == 6
    assert config.train.unet_training_mask == [True]
    assert config.evaluate.metrics() == {
        "FID": {"feature": 64},
        "IS": {"feature": 64, "splits": 10},
        "KID": {"feature": 64, "subset_size": 10},
        "LPIPS": {"net_type": "vgg", "reduction": "mean"},
    }
    tracker = config.tracker
    assert isinstance(tracker.log, WandbLogConfig) and tracker.log.verbose is True
    assert tracker.load is None  # {"load_from": null}: no loader
    assert tracker.overwrite_data_path is True
    wandb_saver, hub_saver = tracker.save
    assert isinstance(wandb_saver, WandbSaveConfig) and wandb_saver.save_latest_to == "latest.pth"
    assert isinstance(hub_saver, HuggingfaceSaveConfig)
    assert (hub_saver.huggingface_repo, hub_saver.save_type) == ("your_user/test_model", "model")
    assert hub_saver.save_meta_to == "path/to/directory/for/assorted/files"


def test_reference_test_config_shape_loads(reference_raw):
    """The reference's CPU test config: CLIP on the fly, resampled shards, console logging, one local saver."""
    raw = reference_raw
    raw["decoder"]["unets"][0].update(
        dim=16, cond_dim=16, attn_dim_head=16, attn_heads=4, self_attn=[False, True, True, True]
    )
    raw["decoder"]["clip"] = {"make": "openai", "model": "ViT-L/14"}
    raw["decoder"]["timesteps"] = 10
    raw["data"] = {
        "webdataset_base_url": "test_data/{}.tar",
        "num_workers": 4,
        "batch_size": 4,
        "start_shard": 0,
        "end_shard": 9,
        "shard_width": 1,
        "index_width": 1,
        "splits": {"train": 0.75, "val": 0.15, "test": 0.1},
        "shuffle_train": False,
        "resample_train": True,
        "preprocessing": {"RandomResizedCrop": {"size": [224, 224]}, "ToTensor": True},
    }
    raw["train"].update(epochs=1, lr=1e-16, device="cpu", epoch_samples=50, validation_samples=5)
    raw["tracker"] = {
        "overwrite_data_path": True,
        "log": {"log_type": "console"},
        "load": {"load_from": None},
        "save": [{"save_to": "local", "save_latest_to": "latest.pth"}],
    }
    config = TrainDecoderConfig.from_dict(raw)
    assert config.decoder.clip.model == "ViT-L/14"
    assert config.decoder.unets[0].options["self_attn"] == [False, True, True, True]
    assert config.data.resample_train and config.train.epoch_samples == 50


def test_reference_trainer_options_are_honoured(reference_raw):
    raw = reference_raw
    raw["train"].update(
        amp=True,
        warmup_steps=[500],
        find_unused_parameters=False,
        static_graph=True,
        save_immediately=True,
        cond_scale=[2.0],
        n_sample_images=3,
    )
    raw["decoder"].update(
        sample_timesteps=[64], image_cond_drop_prob=0.2, text_cond_drop_prob=0.3, learned_variance=[False]
    )
    config = TrainDecoderConfig.from_dict(raw)
    train = config.train
    assert (train.amp, train.warmup_steps, train.find_unused_parameters, train.static_graph) == (
        True,
        [500],
        False,
        True,
    )
    assert (train.save_immediately, train.cond_scale, train.n_sample_images) == (True, [2.0], 3)
    assert train.for_unet("warmup_steps", 1) == 500 and train.for_unet("lr", 1) == 1e-4
    decoder = config.decoder
    assert (decoder.sample_timesteps, decoder.image_cond_drop_prob, decoder.text_cond_drop_prob) == ([64], 0.2, 0.3)
    assert decoder.learned_variance == [False]


def test_reference_options_without_effect_are_accepted_with_a_warning(reference_raw):
    raw = reference_raw
    raw["decoder"]["image_size"] = 64
    raw["tracker"]["save"][0].update(save_all=False, save_latest=True, save_best=True)
    raw["tracker"]["load"] = {"load_from": None, "file_path": "", "only_auto_resume": False}
    raw["tracker"]["save"][1]["save_best_to"] = False  # the reference's way of switching one target off
    with pytest.warns(ConfigWarning) as caught:
        config = TrainDecoderConfig.from_dict(raw)
    messages = [str(warning.message) for warning in caught]
    assert sorted(messages) == sorted(
        [
            "tracker.save[0].save_all: option of the reference trainer that has no effect, ignored; save_latest_to, "
            "save_best_to and save_meta_to decide what is saved",
            "tracker.save[0].save_latest: option of the reference trainer that has no effect, ignored; save_latest_to, "
            "save_best_to and save_meta_to decide what is saved",
            "tracker.save[0].save_best: option of the reference trainer that has no effect, ignored; save_latest_to, "
            "save_best_to and save_meta_to decide what is saved",
            "tracker.load: load_from is null, so no checkpoint is loaded and file_path, only_auto_resume are ignored",
            "decoder.image_size: accepted for compatibility and ignored; "
            "decoder.image_sizes sets the resolution of each U-Net",
        ]
    )
    assert config.tracker.load is None
    assert config.tracker.save[1].save_best_to is None


def test_options_of_early_releases_are_ignored_with_a_warning_or_refused_when_they_would_act(
    reference_raw, config_problems
):
    """LAION's released configs (DALLE2-pytorch 0.15.4): saver flags under train, tracker.log.wandb_resume."""
    raw = copy.deepcopy(reference_raw)
    raw["train"].update(save_all=False, save_latest=True, save_best=True)
    raw["tracker"]["log"].update(log_type="wandb", wandb_entity="e", wandb_project="p", wandb_resume=False)
    _, problems, notes = TrainDecoderConfig.resolve(raw)
    assert problems == []
    assert [n for n in notes if n.startswith(("train.save", "tracker.log"))] == [
        f"train.{name}: a flag of the reference's saver config, which DALLE2-pytorch ignores under train; ignored "
        "here too"
        for name in ("save_all", "save_latest", "save_best")
    ] + [
        "tracker.log.wandb_resume: false: an option of DALLE2-pytorch before 0.23 (later releases ignore it; resume "
        "took its place); ignored"
    ]
    raw["tracker"]["log"]["wandb_resume"] = True  # it resumed the run then; ignoring it would start a new one
    assert config_problems(raw) == [
        "tracker.log.wandb_resume: true resumed the wandb run in DALLE2-pytorch before 0.23, which later releases "
        "ignore: write resume: true (with wandb_run_id) to resume it, or remove it"
    ]


def test_load_null_means_no_loader(minimal_config):
    for load in (None, {"load_from": None}):
        minimal_config["tracker"]["load"] = copy.deepcopy(load)
        assert TrainDecoderConfig.from_dict(minimal_config).tracker.load is None


def test_save_accepts_one_object_or_a_list(minimal_config):
    single = TrainDecoderConfig.from_dict(minimal_config)
    minimal_config["tracker"]["save"] = [minimal_config["tracker"]["save"]]
    assert TrainDecoderConfig.from_dict(minimal_config) == single
    assert len(single.tracker.save) == 1


def test_misspelled_keys_are_still_errors_in_reference_configs(reference_raw, config_problems):
    reference_raw["decoder"]["unets"][0]["attn_head"] = 16
    reference_raw["train"]["amps"] = True
    assert config_problems(reference_raw) == [
        "decoder.unets[0].attn_head: unknown option (did you mean attn_heads?)",
        "train.amps: unknown option (did you mean amp?)",
    ]
