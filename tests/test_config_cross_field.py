"""Cross-field checks: each rule, the message that names what to change, and the valid cases."""

from __future__ import annotations

import warnings

import pytest

from dalle2_decoder.config import ConfigWarning, TrainDecoderConfig


def two_unets(config):
    config["decoder"]["unets"].append({"dim": 16, "image_embed_dim": 64})
    config["decoder"]["image_sizes"] = [64, 256]
    return config


@pytest.mark.parametrize(
    "splits",
    [
        {"train": 0.7, "val": 0.2, "test": 0.1},
        {"train": 0.8, "val": 0.1, "test": 0.1},
        {"train": 1.0, "val": 0.0, "test": 0.0},
        {"train": 0.8, "val": 0.1},
    ],
)
def test_splits_summing_to_one_within_float_tolerance(minimal_config, config_problems, splits):
    minimal_config["data"]["splits"] = splits
    assert config_problems(minimal_config) == []


@pytest.mark.parametrize(
    "splits, total",
    [
        ({"train": 0.8, "val": 0.15, "test": 0.1}, "0.8 + 0.15 + 0.1 = 1.05"),
        ({"train": 0.5}, "0.5 + 0.15 + 0.1 = 0.75"),
    ],
)
def test_splits_not_summing_to_one(minimal_config, config_problems, splits, total):
    minimal_config["data"]["splits"] = splits
    assert config_problems(minimal_config) == [f"data.splits: train + val + test must sum to 1 (got {total})"]


def test_negative_split(minimal_config, config_problems):
    minimal_config["data"]["splits"] = {"train": 1.2, "val": -0.2, "test": 0.0}
    assert config_problems(minimal_config) == [
        "data.splits.train: must be in [0.0, 1.0] (got 1.2)",
        "data.splits.val: must be in [0.0, 1.0] (got -0.2)",
    ]


def test_one_image_size_per_unet(minimal_config, config_problems):
    two_unets(minimal_config)
    minimal_config["decoder"]["image_sizes"] = [64]
    assert config_problems(minimal_config) == [
        "decoder.image_sizes: has 1 sizes but decoder.unets has 2 U-Nets; give one output size per U-Net"
    ]


@pytest.mark.parametrize("sizes", [[256, 64], [64, 64]])
def test_image_sizes_increase(minimal_config, config_problems, sizes):
    two_unets(minimal_config)
    minimal_config["decoder"]["image_sizes"] = sizes
    assert config_problems(minimal_config) == [
        f"decoder.image_sizes: sizes must increase from each U-Net to the next (got {sizes})"
    ]


def test_no_unets(minimal_config, config_problems):
    minimal_config["decoder"]["unets"] = []
    minimal_config["decoder"]["image_sizes"] = []
    assert config_problems(minimal_config) == ["decoder.unets: needs at least one U-Net"]


def test_resample_train_excludes_shuffle_train(minimal_config, config_problems):
    minimal_config["data"]["resample_train"] = True
    minimal_config["train"] = {"epoch_samples": 1000}
    assert config_problems(minimal_config) == [
        "data.resample_train: cannot be combined with data.shuffle_train; set shuffle_train to false "
        "(resampling already draws shards at random)"
    ]


def test_resample_train_requires_epoch_samples(minimal_config, config_problems):
    minimal_config["data"].update(resample_train=True, shuffle_train=False)
    assert config_problems(minimal_config) == [
        "data.resample_train: needs train.epoch_samples, since a resampled epoch never ends by itself"
    ]
    minimal_config["train"] = {"epoch_samples": 1000}
    assert config_problems(minimal_config) == []


def test_end_shard_not_before_start_shard(minimal_config, config_problems):
    minimal_config["data"].update(start_shard=10, end_shard=9)
    assert config_problems(minimal_config) == ["data.end_shard: must be at least data.start_shard (10), got 9"]
    minimal_config["data"]["end_shard"] = 12  # a shard for each of the three splits
    assert config_problems(minimal_config) == []


def test_unet_training_mask_one_entry_per_unet(minimal_config, config_problems):
    two_unets(minimal_config)
    minimal_config["train"] = {"unet_training_mask": [True]}
    assert config_problems(minimal_config) == [
        "train.unet_training_mask: has 1 entries but decoder.unets has 2 U-Nets; "
        "give one value for all U-Nets or one per U-Net"
    ]
    minimal_config["train"] = {"unet_training_mask": [False, True]}
    assert config_problems(minimal_config) == []


def test_unet_training_mask_trains_something(minimal_config, config_problems):
    minimal_config["train"] = {"unet_training_mask": [False]}
    assert config_problems(minimal_config) == [
        "train.unet_training_mask: freezes every U-Net; at least one entry must be true"
    ]


@pytest.mark.parametrize(
    "name, value",
    [
        ("lr", [1e-4, 2e-4, 3e-4]),
        ("wd", [0.01]),
        ("max_grad_norm", [0.5, 1.0, 1.0]),
        ("cond_scale", [1.0]),
        ("warmup_steps", [100]),
    ],
)
def test_per_unet_lists_have_one_entry_per_unet(minimal_config, config_problems, name, value):
    two_unets(minimal_config)
    minimal_config["train"] = {name: value}
    assert config_problems(minimal_config) == [
        f"train.{name}: has {len(value)} entries but decoder.unets has 2 U-Nets; "
        "give one value for all U-Nets or one per U-Net"
    ]
    minimal_config["train"] = {name: value[0]}
    assert config_problems(minimal_config) == []
    minimal_config["train"] = {name: [value[0], value[0]]}
    assert config_problems(minimal_config) == []


@pytest.mark.parametrize("name, value", [("beta_schedule", ["cosine"]), ("sample_timesteps", [50])])
def test_decoder_per_unet_lists(minimal_config, config_problems, name, value):
    two_unets(minimal_config)
    minimal_config["decoder"][name] = value
    assert config_problems(minimal_config) == [
        f"decoder.{name}: has {len(value)} entries but decoder.unets has 2 U-Nets; "
        "give one value for all U-Nets or one per U-Net"
    ]


def test_learned_variance_list_is_padded_not_extended(minimal_config, config_problems):
    two_unets(minimal_config)
    minimal_config["decoder"]["learned_variance"] = [True]  # padded with false, as the reference
    assert config_problems(minimal_config) == []
    minimal_config["decoder"]["learned_variance"] = [True, False, True]
    assert config_problems(minimal_config) == [
        "decoder.learned_variance: has 3 entries but decoder.unets has 2 U-Nets; a shorter list is padded with false"
    ]


@pytest.mark.parametrize("name", ["use_noise_for_lowres_cond", "use_blur_for_lowres_cond"])
def test_lowres_augmentation_lists(minimal_config, config_problems, name):
    two_unets(minimal_config)
    minimal_config["decoder"][name] = [True]  # one per upsampler
    assert config_problems(minimal_config) == []
    minimal_config["decoder"][name] = [False, True]  # one per U-Net
    assert config_problems(minimal_config) == []
    minimal_config["decoder"][name] = [True, True]
    assert config_problems(minimal_config) == [f"decoder.{name}[0]: must be false (U-Net 1 has no low-res input)"]
    minimal_config["decoder"][name] = [True, True, True]
    assert config_problems(minimal_config)[0].startswith(f"decoder.{name}: has 3 entries")


def test_upsampler_needs_an_augmentation_and_no_image_embed_dim(minimal_config, config_problems):
    two_unets(minimal_config)
    del minimal_config["decoder"]["unets"][1]["image_embed_dim"]  # upsamplers do not see the embedding
    assert config_problems(minimal_config) == []
    minimal_config["decoder"]["use_blur_for_lowres_cond"] = False
    assert config_problems(minimal_config) == [
        "decoder: U-Net 2 (an upsampler) needs noise or blur augmentation of its low-res input; "
        "set use_noise_for_lowres_cond or use_blur_for_lowres_cond"
    ]
    minimal_config["decoder"]["use_blur_for_lowres_cond"] = True
    minimal_config["decoder"]["image_embed_all_unets"] = True
    assert config_problems(minimal_config) == ["decoder.unets[1].image_embed_dim: required option missing"]


def test_default_schedules_need_more_than_20_timesteps_in_a_cascade(minimal_config, config_problems):
    minimal_config["decoder"]["timesteps"] = 10
    minimal_config["decoder"]["beta_schedule"] = None  # the reference's rule: cosine, then linear for the last
    assert config_problems(minimal_config) == []  # one U-Net: cosine
    two_unets(minimal_config)
    assert config_problems(minimal_config) == [
        "decoder.beta_schedule (null: linear for the last U-Net of a cascade): U-Net 2's linear schedule has betas of "
        "1 or more with decoder.timesteps = 10; use more than 20 timesteps or the cosine schedule"
    ]
    minimal_config["decoder"]["beta_schedule"] = "cosine"
    assert config_problems(minimal_config) == []


def test_unconditional_unets_need_no_image_embed_dim(minimal_config, config_problems):
    del minimal_config["decoder"]["unets"][0]["image_embed_dim"]
    assert config_problems(minimal_config) == ["decoder.unets[0].image_embed_dim: required option missing"]
    minimal_config["decoder"]["unconditional"] = True
    assert config_problems(minimal_config) == []


def test_lr_may_be_zero_only_for_frozen_unets(minimal_config, config_problems):
    two_unets(minimal_config)
    minimal_config["train"] = {"lr": [0.0, 1e-4], "unet_training_mask": [False, True]}
    assert config_problems(minimal_config) == []
    minimal_config["train"] = {"lr": [0.0, 1e-4]}
    assert config_problems(minimal_config) == ["train.lr[0]: must be greater than 0 for a U-Net that is trained"]


def test_text_conditioning_needs_text_embeddings_or_clip(minimal_config, config_problems):
    minimal_config["decoder"]["unets"][0]["cond_on_text_encodings"] = True
    minimal_config["data"]["img_embeddings_url"] = "embeddings/img_emb"
    assert config_problems(minimal_config) == [
        "data.text_embeddings_url: decoder.unets[0] conditions on text (cond_on_text_encodings) but there is no "
        "source of text embeddings; give text_embeddings_url, keep them in the shards (embeddings_in_shards), "
        "or set decoder.clip"
    ]
    with_url = dict(minimal_config, data=dict(minimal_config["data"], text_embeddings_url="embeddings/text_emb"))
    assert config_problems(with_url) == []
    in_shards = dict(minimal_config, data=dict(minimal_config["data"], embeddings_in_shards=True))
    assert config_problems(in_shards) == []
    with_clip = dict(minimal_config, decoder=dict(minimal_config["decoder"], clip={}))
    assert config_problems(with_clip) == []


def test_images_need_an_embedding_source(minimal_config, config_problems):
    minimal_config["data"]["embeddings_in_shards"] = False
    assert config_problems(minimal_config) == [
        "data.img_embeddings_url: the decoder needs image embeddings and has no source for them; give "
        "img_embeddings_url, keep them in the shards (embeddings_in_shards), or set decoder.clip to compute them"
    ]
    for fix in (
        {"data": dict(minimal_config["data"], img_embeddings_url="emb/img_emb")},
        {"decoder": dict(minimal_config["decoder"], clip={"make": "open_clip", "model": "ViT-B-32"})},
        {"decoder": dict(minimal_config["decoder"], unconditional=True)},
    ):
        assert config_problems(dict(minimal_config, **fix)) == []


def test_embeddings_in_the_shards_by_default(minimal_config, config_problems):
    # no img_embeddings_url and no clip: the embeddings are read from the shards themselves
    assert config_problems(minimal_config) == []


def test_a_run_saves_something(minimal_config, config_problems):
    minimal_config["tracker"]["save"] = [{"save_to": "local"}, {"save_to": "local", "save_meta_to": None}]
    assert config_problems(minimal_config) == [
        f"tracker.save[{i}]: saves nothing; set save_latest_to, save_best_to or save_meta_to" for i in (0, 1)
    ]


def test_a_saver_that_saves_nothing_beside_one_that_saves_is_left_out_with_a_warning(minimal_config):
    """LAION's released configs have `{"save_to": "wandb"}` (which saved latest.pth and best.pth before 0.26.2)."""
    minimal_config["tracker"]["save"] = [{"save_to": "local"}, {"save_to": "local", "save_best_to": "best.pth"}]
    _, problems, notes = TrainDecoderConfig.resolve(minimal_config)
    assert problems == []
    assert [n for n in notes if n.startswith("tracker.save")] == [
        "tracker.save[0]: saves nothing (no save_latest_to, save_best_to or save_meta_to), left out of the run; "
        "DALLE2-pytorch before 0.26.2 saved latest.pth and best.pth there by default: set save_latest_to and "
        "save_best_to to save there"
    ]


def test_at_least_one_saver(minimal_config, config_problems):
    minimal_config["tracker"]["save"] = []
    assert config_problems(minimal_config) == ["tracker.save: needs at least one saver"]


def test_wandb_savers_and_loaders_need_a_wandb_run(minimal_config, config_problems):
    minimal_config["tracker"]["save"] = [{"save_to": "wandb", "save_latest_to": "latest.pth"}]
    minimal_config["tracker"]["load"] = {"load_from": "wandb", "wandb_file_path": "latest.pth"}
    assert config_problems(minimal_config) == [
        "tracker.load.wandb_run_path: needed unless tracker.log.log_type is wandb (without it the checkpoint is "
        "taken from the logged run)",
        "tracker.save[0].wandb_run_path: needed unless tracker.log.log_type is wandb (without it saves go into "
        "the logged run)",
    ]
    minimal_config["tracker"]["log"] = {"log_type": "wandb", "wandb_entity": "team", "wandb_project": "proj"}
    assert config_problems(minimal_config) == []


def test_checkpoints_are_not_saved_as_safetensors(minimal_config, config_problems):
    minimal_config["tracker"]["save"] = [
        {"save_to": "local", "save_latest_to": "latest.safetensors"},
        {"save_to": "huggingface", "huggingface_repo": "u/r", "save_best_to": "best.safetensors", "save_type": "model"},
    ]
    assert config_problems(minimal_config) == [
        "tracker.save[0].save_latest_to: latest.safetensors ends in .safetensors but save_type is checkpoint; "
        "safetensors holds model weights only (save_type: model), checkpoints are .pt files"
    ]


def test_savers_are_told_apart_by_save_to_not_by_the_save_type_they_share(minimal_config):
    from dalle2_decoder.config import HuggingfaceSaveConfig, LocalSaveConfig, TrainDecoderConfig, WandbSaveConfig

    minimal_config["tracker"]["log"] = {"log_type": "wandb", "wandb_entity": "t", "wandb_project": "p"}
    minimal_config["tracker"]["save"] = [
        {"save_to": "wandb", "save_type": "model", "save_latest_to": "a.pth"},
        {"save_to": "huggingface", "huggingface_repo": "u/r", "save_type": "model", "save_best_to": "b.pth"},
        {"save_to": "local", "save_type": "model", "save_meta_to": "meta"},
    ]
    savers = TrainDecoderConfig.from_dict(minimal_config).tracker.save
    assert [type(saver) for saver in savers] == [WandbSaveConfig, HuggingfaceSaveConfig, LocalSaveConfig]
    assert [saver.save_type for saver in savers] == ["model"] * 3
    assert (savers[0].save_latest_to, savers[1].save_best_to, savers[2].save_meta_to) == ("a.pth", "b.pth", "meta")


def test_wandb_resume_needs_a_run_id(minimal_config, config_problems):
    minimal_config["tracker"]["log"] = {"log_type": "wandb", "wandb_entity": "t", "wandb_project": "p", "resume": True}
    assert config_problems(minimal_config) == ["tracker.log.resume: needs tracker.log.wandb_run_id, the run to resume"]


def test_empty_names_are_rejected(minimal_config, config_problems):
    minimal_config["tracker"]["log"] = {"log_type": "wandb", "wandb_entity": "", "wandb_project": "p"}
    minimal_config["tracker"]["save"] = [{"save_to": "huggingface", "huggingface_repo": " ", "save_latest_to": "x"}]
    assert config_problems(minimal_config) == [
        "tracker.log.wandb_entity: must not be empty",
        "tracker.save[0].huggingface_repo: must not be empty",
    ]


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("decoder", "loss_type", "l3", 'decoder.loss_type: unknown value "l3"; expected one of l1, l2, huber'),
        (
            "decoder",
            "loss_type",
            "hubr",
            'decoder.loss_type: unknown value "hubr" (did you mean huber?); expected one of l1, l2, huber',
        ),
        (
            "decoder",
            "beta_schedule",
            "cosin",
            'decoder.beta_schedule: unknown value "cosin" (did you mean cosine?); '
            "expected one of cosine, linear, quadratic, jsd, sigmoid",
        ),
        ("decoder", "timesteps", 0, "decoder.timesteps: must be at least 1 (got 0)"),
        (
            "decoder",
            "sample_timesteps",
            2000,
            "decoder.sample_timesteps: U-Net 1 samples with 2000 steps; it must be "
            "between 1 and decoder.timesteps (1000)",
        ),
        ("decoder", "image_cond_drop_prob", 1.5, "decoder.image_cond_drop_prob: must be in [0.0, 1.0] (got 1.5)"),
        ("data", "num_workers", -1, "data.num_workers: must be at least 0 (got -1)"),
        ("train", "epochs", 0, "train.epochs: must be at least 1 (got 0)"),
        ("train", "ema_beta", 1.5, "train.ema_beta: must be in [0.0, 1.0] (got 1.5)"),
        ("train", "wd", -0.1, "train.wd: must be at least 0.0 (got -0.1)"),
        (
            "train",
            "mixed_precision",
            "bf61",
            'train.mixed_precision: unknown value "bf61" (did you mean bf16?); expected one of no, fp16, bf16',
        ),
        ("train", "device", "gpu0", None),
        ("evaluate", "n_evaluation_samples", 0, "evaluate.n_evaluation_samples: must be at least 1 (got 0)"),
    ],
)
def test_value_checks(minimal_config, config_problems, section, key, value, expected):
    minimal_config.setdefault(section, {})[key] = value
    problems = config_problems(minimal_config)
    if expected is None:
        assert len(problems) == 1 and problems[0].startswith(f"{section}.{key}: ")
    else:
        assert problems == [expected]


def test_clip_make_is_checked(minimal_config, config_problems):
    minimal_config["decoder"]["clip"] = {"make": "x-clip"}
    assert config_problems(minimal_config) == [
        'decoder.clip.make: unknown value "x-clip"; expected one of openai, open_clip'
    ]


def test_image_size_is_accepted_and_ignored_with_a_warning(minimal_config):
    minimal_config["decoder"]["image_size"] = 12345
    with pytest.warns(ConfigWarning, match=r"decoder.image_size: accepted for compatibility and ignored"):
        config = TrainDecoderConfig.from_dict(minimal_config)
    assert config.decoder.image_sizes == [64]


def test_valid_config_gives_no_warning(minimal_config):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainDecoderConfig.from_dict(minimal_config)


def test_cross_field_checks_run_on_sections_that_structured(minimal_config, config_problems):
    # decoder has a structural problem; data's own rules and its rules against train still run
    minimal_config["decoder"]["unets"][0]["dim"] = "x"
    minimal_config["data"].update(resample_train=True, shuffle_train=False)
    assert config_problems(minimal_config) == [
        'decoder.unets[0].dim: expected an integer, got "x"',
        "data.resample_train: needs train.epoch_samples, since a resampled epoch never ends by itself",
    ]
