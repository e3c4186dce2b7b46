"""Structural problems: unknown keys (with suggestions), wrong types, missing options, bad kinds.

Every problem is reported at once, each as `path: reason` with the path in JSON notation.
"""

from __future__ import annotations

import json

import pytest

from dalle2_decoder import ConfigError, TrainDecoderConfig


def test_misspelled_unet_option_names_the_closest_valid_one(minimal_config, config_problems):
    minimal_config["decoder"]["unets"][0]["dim_mult"] = [1, 2]
    assert config_problems(minimal_config) == ["decoder.unets[0].dim_mult: unknown option (did you mean dim_mults?)"]


@pytest.mark.parametrize(
    "path, key, expected",
    [
        ((), "seeed", "seeed: unknown option (did you mean seed?)"),
        (("decoder",), "timestep", "decoder.timestep: unknown option (did you mean timesteps?)"),
        (
            ("decoder",),
            "use_blur_for_lowres_cnd",
            "decoder.use_blur_for_lowres_cnd: unknown option (did you mean use_blur_for_lowres_cond?)",
        ),
        (
            ("decoder", "unets", 0),
            "cond_on_text_encoding",
            "decoder.unets[0].cond_on_text_encoding: unknown option (did you mean cond_on_text_encodings?)",
        ),
        (("data",), "batchsize", "data.batchsize: unknown option (did you mean batch_size?)"),
        (("data",), "zzz", "data.zzz: unknown option"),
        (("tracker", "log"), "wandb_entity", "tracker.log.wandb_entity: unknown option"),
        (("tracker", "log"), "verbos", "tracker.log.verbos: unknown option (did you mean verbose?)"),
    ],
)
def test_unknown_keys_everywhere(minimal_config, config_problems, path, key, expected):
    target = minimal_config
    for step in path:
        target = target.setdefault(step, {}) if isinstance(step, str) else target[step]
    target[key] = 1
    assert config_problems(minimal_config) == [expected]


def test_unknown_keys_in_sections_that_are_not_given(minimal_config, config_problems):
    minimal_config["train"] = {"lr_": 1e-4}
    minimal_config["evaluate"] = {"n_evaluation_sample": 10}
    assert config_problems(minimal_config) == [
        "train.lr_: unknown option (did you mean lr?)",
        "evaluate.n_evaluation_sample: unknown option (did you mean n_evaluation_samples?)",
    ]


def test_options_is_not_a_config_key(minimal_config, config_problems):
    minimal_config["decoder"]["unets"][0]["options"] = {"self_attn": True}
    assert config_problems(minimal_config) == ["decoder.unets[0].options: unknown option"]


def test_wrong_types_are_strict(minimal_config, config_problems):
    minimal_config["decoder"]["unets"][0]["dim"] = "16"
    minimal_config["data"]["shuffle_train"] = "false"
    minimal_config["data"]["batch_size"] = 2.5
    minimal_config["train"] = {"lr": [1e-4, "fast"], "wd": "none"}
    minimal_config["decoder"]["image_sizes"] = 64
    assert sorted(config_problems(minimal_config)) == sorted(
        [
            'decoder.unets[0].dim: expected an integer, got "16"',
            "decoder.image_sizes: expected a list of integers, got 64",
            'data.shuffle_train: expected true or false, got "false"',
            "data.batch_size: expected an integer, got 2.5",
            'train.lr[1]: expected a number, got "fast"',
            'train.wd: expected a number or a list of numbers, got "none"',
        ]
    )


def test_integral_floats_are_integers(minimal_config):
    minimal_config["train"] = {"save_every_n_samples": 1e5, "lr": 1}
    config = TrainDecoderConfig.from_dict(minimal_config)
    assert config.train.save_every_n_samples == 100000 and isinstance(config.train.save_every_n_samples, int)
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


def test_constructor_options_are_type_checked_by_their_annotations(minimal_config, config_problems):
    minimal_config["decoder"]["unets"][0]["self_attn"] = "yes"
    minimal_config["decoder"]["unets"][0]["attn_heads"] = [4]
    minimal_config["decoder"]["blur_prob"] = "high"
    problems = config_problems(minimal_config)
    assert len(problems) == 3
    assert problems[0].startswith('decoder.unets[0].self_attn: expected true or false or a list of booleans, got "yes"')
    assert problems[1] == "decoder.unets[0].attn_heads: expected an integer, got [4]"
    assert problems[2] == 'decoder.blur_prob: expected a number, got "high"'


@pytest.mark.parametrize("section", ["decoder", "data", "tracker"])
def test_missing_required_sections(minimal_config, config_problems, section):
    del minimal_config[section]
    assert config_problems(minimal_config) == [f"{section}: required section missing"]


@pytest.mark.parametrize(
    "path, key, expected",
    [
        (("decoder", "unets", 0), "dim", "decoder.unets[0].dim: required option missing"),
        (("decoder", "unets", 0), "image_embed_dim", "decoder.unets[0].image_embed_dim: required option missing"),
        (("decoder",), "image_sizes", "decoder.image_sizes: required option missing"),
        (("decoder",), "unets", "decoder.unets: required option missing"),
        (("data",), "webdataset_base_url", "data.webdataset_base_url: required option missing"),
        (("tracker",), "log", "tracker.log: required option missing"),
        (("tracker",), "save", "tracker.save: required option missing"),
    ],
)
def test_missing_required_options(minimal_config, config_problems, path, key, expected):
    target = minimal_config
    for step in path:
        target = target[step]
    del target[key]
    problems = config_problems(minimal_config)
    assert expected in problems
    assert len(problems) == 1 or key == "unets"  # without U-Nets, image_sizes has nothing to match


@pytest.mark.parametrize(
    "family, value, expected",
    [
        (
            "log",
            {"log_type": "mlflow"},
            'tracker.log.log_type: unknown kind "mlflow"; expected one of console, wandb, tensorboard',
        ),
        (
            "log",
            {"log_type": "wandbb", "wandb_entity": "e", "wandb_project": "p"},
            'tracker.log.log_type: unknown kind "wandbb" (did you mean wandb?); '
            "expected one of console, wandb, tensorboard",
        ),
        (
            "log",
            {"resume": False},
            "tracker.log.log_type: required option missing (one of console, wandb, tensorboard)",
        ),
        (
            "load",
            {"load_from": "s3", "url": "s3://x"},
            'tracker.load.load_from: unknown kind "s3"; expected one of local, url, wandb, unet_sources',
        ),
        (
            "save",
            {"save_to": "gcs", "save_latest_to": "x"},
            'tracker.save[0].save_to: unknown kind "gcs"; expected one of local, huggingface, wandb',
        ),
    ],
)
def test_unknown_kinds(minimal_config, config_problems, family, value, expected):
    minimal_config["tracker"][family] = value
    assert config_problems(minimal_config) == [expected]


@pytest.mark.parametrize(
    "family, value, missing",
    [
        ("log", {"log_type": "wandb", "wandb_project": "p"}, ["tracker.log.wandb_entity"]),
        ("log", {"log_type": "wandb"}, ["tracker.log.wandb_entity", "tracker.log.wandb_project"]),
        ("load", {"load_from": "local"}, ["tracker.load.file_path"]),
        ("load", {"load_from": "url"}, ["tracker.load.url"]),
        ("load", {"load_from": "wandb", "wandb_run_path": "e/p/id"}, ["tracker.load.wandb_file_path"]),
        ("save", [{"save_to": "huggingface", "save_latest_to": "x"}], ["tracker.save[0].huggingface_repo"]),
    ],
)
def test_each_kind_has_its_required_keys(minimal_config, config_problems, family, value, missing):
    minimal_config["tracker"][family] = value
    assert config_problems(minimal_config) == [f"{path}: required option missing" for path in missing]


def test_keys_of_another_kind_are_unknown(minimal_config, config_problems):
    minimal_config["tracker"]["load"] = {"load_from": "local", "file_path": "x", "url": "http://host/x"}
    assert config_problems(minimal_config) == ["tracker.load.url: unknown option"]


def test_literal_values_suggest(minimal_config, config_problems):
    minimal_config["tracker"]["save"]["save_type"] = "modle"
    assert config_problems(minimal_config) == [
        'tracker.save[0].save_type: must be one of "checkpoint", "model" (got "modle"; did you mean "model"?)'
    ]


def test_metric_keys_are_checked_against_torchmetrics(minimal_config, config_problems):
    minimal_config["evaluate"] = {
        "FID": {"feature": 64, "normalise": True},
        "IS": {"splits": 10, "feature": 64},
        "KID": {"subset_sizes": 10},
        "LPIPS": {"net_type": "vgg", "weights_path": "lpips.pth", "dist_sync_on_step": True},
    }
    assert config_problems(minimal_config) == [
        "evaluate.FID.normalise: unknown option (did you mean normalize?)",
        "evaluate.KID.subset_sizes: unknown option (did you mean subset_size?)",
        "evaluate.LPIPS.dist_sync_on_step: unknown option",
    ]


def test_preprocessing_problems_are_placed_at_the_transform(minimal_config, config_problems):
    minimal_config["data"]["preprocessing"] = {"RandomResizeCrop": {"size": 64}, "ToTensor": True}
    problems = config_problems(minimal_config)
    assert len(problems) == 1
    assert problems[0].startswith("data.preprocessing.RandomResizeCrop: ")
    assert "RandomResizedCrop" in problems[0]


def test_every_problem_is_reported_at_once(minimal_config, config_problems):
    minimal_config["decoder"]["unets"][0]["dim_mult"] = [1, 2]
    minimal_config["data"]["end_shard"] = -1
    minimal_config["data"]["splits"] = {"train": 0.5, "val": 0.2, "test": 0.2}
    minimal_config["train"] = {"epochs": "many"}
    minimal_config["tracker"]["log"]["log_type"] = "consol"
    minimal_config["extra"] = True
    problems = config_problems(minimal_config)
    assert problems == [
        "extra: unknown option",
        "decoder.unets[0].dim_mult: unknown option (did you mean dim_mults?)",
        'train.epochs: expected an integer, got "many"',
        'tracker.log.log_type: unknown kind "consol" (did you mean console?); '
        "expected one of console, wandb, tensorboard",
        "data.splits: train + val + test must sum to 1 (got 0.5 + 0.2 + 0.2 = 0.9)",
        "data.end_shard: must be at least data.start_shard (0), got -1",
    ]


def test_config_error_lists_every_problem(minimal_config):
    minimal_config["decoder"]["unets"][0]["dim_mult"] = [1, 2]
    minimal_config["data"]["batch_size"] = 0
    with pytest.raises(ConfigError) as caught:
        TrainDecoderConfig.from_dict(minimal_config, source="my.json")
    assert isinstance(caught.value, ValueError)
    assert caught.value.problems == [
        "decoder.unets[0].dim_mult: unknown option (did you mean dim_mults?)",
        "data.batch_size: must be at least 1 (got 0)",
    ]
    assert str(caught.value).splitlines() == [
        "my.json: 2 problems",
        "  decoder.unets[0].dim_mult: unknown option (did you mean dim_mults?)",
        "  data.batch_size: must be at least 1 (got 0)",
    ]


def test_from_json_path_reports_unreadable_and_invalid_files(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError) as caught:
        TrainDecoderConfig.from_json_path(missing)
    assert caught.value.problems == ["cannot read the file: No such file or directory"]
    broken = tmp_path / "broken.json"
    broken.write_text('{"decoder": {,}}')
    with pytest.raises(ConfigError) as caught:
        TrainDecoderConfig.from_json_path(broken)
    assert caught.value.problems == [
        "not valid JSON: Expecting property name enclosed in double quotes at line 1, column 14"
    ]
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError) as caught:
        TrainDecoderConfig.from_json_path(listing)
    assert caught.value.problems == ["the configuration must be a JSON object, got list"]


def test_from_json_path_loads(minimal_config, write_config):
    config = TrainDecoderConfig.from_json_path(write_config(minimal_config))
    assert config == TrainDecoderConfig.from_dict(minimal_config)
    assert config.decoder.unets[0].dim == 16


def test_preprocessing_problems_are_the_data_pipelines_own_at_each_transform():
    from dalle2_decoder.config.preprocessing import preprocessing_problems
    from dalle2_decoder.data import validate_preprocessing

    spec = {"RandomResizeCrop": True, "Resize": {"sise": 64}, "ToTensor": True}
    problems = preprocessing_problems(spec)
    # one rule: the loader's validator and the config check give the same problems
    assert problems == [f"data.preprocessing.{line}" for line in validate_preprocessing(spec)]
    assert problems[0] == (
        "data.preprocessing.RandomResizeCrop: unknown transform 'RandomResizeCrop'; did you mean 'RandomResizedCrop'?"
    )
    assert problems[1].startswith("data.preprocessing.Resize: bad arguments") and "sise" in problems[1]
    assert preprocessing_problems(["Resize"]) == [
        "data.preprocessing: must be an object of transform name -> arguments, got list"
    ]
    assert preprocessing_problems({"RandomResizedCrop": {"size": 64}, "ToTensor": True, "Normalize": False}) == []
