"""Every default stated by the configuration reference, as the loaded config sees it."""

from __future__ import annotations

import pytest

from dalle2_decoder.config import (
    HuggingfaceSaveConfig,
    LocalLoadConfig,
    LocalSaveConfig,
    TrainDecoderConfig,
    UrlLoadConfig,
    WandbLoadConfig,
    WandbLogConfig,
    WandbSaveConfig,
)


@pytest.fixture
def loaded(minimal_config):
    return TrainDecoderConfig.from_dict(minimal_config)


def test_unet_defaults(loaded):
    unet = loaded.decoder.unets[0]
    assert unet.dim == 16 and unet.image_embed_dim == 64
    assert tuple(unet.dim_mults) == (1, 2, 4, 8)
    assert unet.options == {}


def test_decoder_defaults(loaded):
    decoder = loaded.decoder
    assert decoder.timesteps == 1000
    assert decoder.loss_type == "l2"
    assert decoder.beta_schedule == "cosine"  # the seed's documented default: cosine for every U-Net
    assert decoder.learned_variance is True
    assert decoder.clip is None
    assert decoder.image_size is None
    assert decoder.image_cond_drop_prob == 0.1
    assert decoder.text_cond_drop_prob == 0.5
    assert decoder.sample_timesteps is None


def test_clip_defaults(minimal_config):
    minimal_config["decoder"]["clip"] = {}
    clip = TrainDecoderConfig.from_dict(minimal_config).decoder.clip
    assert (clip.make, clip.model) == ("openai", "ViT-L/14")


def test_data_defaults(loaded):
    data = loaded.data
    assert data.img_embeddings_url is None
    assert data.text_embeddings_url is None
    assert data.num_workers == 4
    assert data.batch_size == 64
    assert data.start_shard == 0
    assert data.end_shard == 9999999
    assert data.shard_width == 6
    assert data.index_width == 4
    assert (data.splits.train, data.splits.val, data.splits.test) == (0.75, 0.15, 0.1)
    assert data.shuffle_train is True
    assert data.resample_train is False
    assert data.preprocessing == {"ToTensor": True}


def test_train_defaults(loaded):
    train = loaded.train
    assert train.epochs == 20
    assert train.lr == 1e-4
    assert train.wd == 0.01
    assert train.max_grad_norm == 0.5
    assert train.save_every_n_samples == 100000
    assert train.cond_scale == 1.0
    assert train.device == "cuda:0"
    assert train.epoch_samples is None
    assert train.validation_samples is None
    assert train.use_ema is True
    assert train.ema_beta == 0.99
    assert train.unet_training_mask is None
    # options the reference trainer documents beyond the table
    assert train.n_sample_images == 6
    assert train.amp is False
    assert train.save_immediately is False
    assert train.warmup_steps is None
    assert train.find_unused_parameters is True


def test_evaluate_defaults(loaded):
    evaluate = loaded.evaluate
    assert evaluate.n_evaluation_samples == 1000
    assert (evaluate.FID, evaluate.IS, evaluate.KID, evaluate.LPIPS) == (None, None, None, None)
    assert evaluate.metrics() == {}


def test_tracker_defaults(loaded):
    tracker = loaded.tracker
    assert tracker.data_path == "./.tracker-data"
    assert tracker.overwrite_data_path is False
    assert tracker.load is None
    assert tracker.log.resume is False and tracker.log.auto_resume is False
    assert tracker.log.verbose is False


def test_top_level_defaults(loaded):
    assert loaded.seed == 0


def test_wandb_log_defaults(minimal_config):
    minimal_config["tracker"]["log"] = {"log_type": "wandb", "wandb_entity": "team", "wandb_project": "proj"}
    log = TrainDecoderConfig.from_dict(minimal_config).tracker.log
    assert isinstance(log, WandbLogConfig)
    assert (log.wandb_run_name, log.wandb_run_id, log.resume, log.auto_resume) == (None, None, False, False)


@pytest.mark.parametrize(
    "load, cls, expected",
    [
        ({"load_from": "local", "file_path": "ckpt.pth"}, LocalLoadConfig, {"only_auto_resume": False}),
        ({"load_from": "url", "url": "http://host/ckpt.pth"}, UrlLoadConfig, {"only_auto_resume": False}),
        (
            {"load_from": "wandb", "wandb_file_path": "latest.pth"},
            WandbLoadConfig,
            {"only_auto_resume": False, "wandb_run_path": None},
        ),
    ],
)
def test_loader_defaults(minimal_config, load, cls, expected):
    minimal_config["tracker"]["load"] = load
    minimal_config["tracker"]["log"] = {"log_type": "wandb", "wandb_entity": "team", "wandb_project": "proj"}
    loaded = TrainDecoderConfig.from_dict(minimal_config).tracker.load
    assert isinstance(loaded, cls)
    for name, value in expected.items():
        assert getattr(loaded, name) == value


@pytest.mark.parametrize(
    "save, cls, expected",
    [
        ({"save_to": "local", "save_meta_to": "meta"}, LocalSaveConfig, {}),
        (
            {"save_to": "huggingface", "huggingface_repo": "me/decoder", "save_meta_to": "meta"},
            HuggingfaceSaveConfig,
            {"token_path": None},
        ),
        ({"save_to": "wandb", "save_meta_to": "meta"}, WandbSaveConfig, {"wandb_run_path": None}),
    ],
)
def test_saver_defaults(minimal_config, save, cls, expected):
    minimal_config["tracker"]["save"] = [save]
    minimal_config["tracker"]["log"] = {"log_type": "wandb", "wandb_entity": "team", "wandb_project": "proj"}
    saver = TrainDecoderConfig.from_dict(minimal_config).tracker.save[0]
    assert isinstance(saver, cls)
    assert (saver.save_latest_to, saver.save_best_to, saver.save_type) == (None, None, "checkpoint")
    for name, value in expected.items():
        assert getattr(saver, name) == value


def test_to_dict_fills_in_every_default(loaded):
    resolved = loaded.to_dict()
    assert resolved["decoder"]["unets"][0]["dim_mults"] == [1, 2, 4, 8]
    assert resolved["decoder"]["timesteps"] == 1000
    assert resolved["data"]["splits"] == {"train": 0.75, "val": 0.15, "test": 0.1}
    assert resolved["train"]["device"] == "cuda:0"
    assert resolved["evaluate"]["n_evaluation_samples"] == 1000
    assert resolved["tracker"]["data_path"] == "./.tracker-data"
    assert resolved["tracker"]["save"] == [
        {
            "save_to": "local",
            "save_latest_to": "latest.pth",
            "save_best_to": None,
            "save_meta_to": None,
            "save_type": "checkpoint",
            "keep_last": None,
        }
    ]
    assert resolved["tracker"]["progress_interval_s"] == 30.0
    assert resolved["tracker"]["load"] is None
    assert resolved["seed"] == 0


def test_per_unet_options_are_read_by_unet_number_from_1():
    """U-Nets are numbered from 1 at every public boundary; 0 would pick the last one silently."""
    from dalle2_decoder.config import TrainConfig

    train = TrainConfig(lr=[1e-4, 2e-4], unet_training_mask=[False, True])
    assert [train.for_unet("lr", number) for number in (1, 2)] == [1e-4, 2e-4]
    assert [train.trains_unet(number) for number in (1, 2)] == [False, True]
    assert train.for_unet("wd", 2) == train.wd  # one value for every U-Net
    for call in (lambda: train.for_unet("lr", 0), lambda: train.trains_unet(0)):
        with pytest.raises(ValueError, match="numbered from 1"):
            call()
