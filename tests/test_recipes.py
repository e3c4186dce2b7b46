"""The `recipe` key: a named set of option values filled in where a config leaves them out.

What a recipe turns on is checked on what the user gets (the structured config and the built
Decoder), not on the recipe table alone; the measurements behind it are bench/recipe.py's
(docs/RECIPE.md), not a test's.
"""

from __future__ import annotations

import copy

import pytest

from dalle2_decoder.config import ConfigError, TrainDecoderConfig
from dalle2_decoder.config.recipes import RECIPES, SAMPLE_EFFICIENT, apply_recipe


def with_recipe(raw, name):
    raw = copy.deepcopy(raw)
    raw["recipe"] = name
    return raw


def test_the_default_recipe_is_the_reference_and_changes_nothing(minimal_config):
    plain = TrainDecoderConfig.from_dict(minimal_config)
    named = TrainDecoderConfig.from_dict(with_recipe(minimal_config, "reference"))
    assert plain.recipe == "reference"
    assert plain == named
    assert RECIPES["reference"] == {}


def test_sample_efficient_turns_on_v_prediction_in_the_built_decoder(minimal_config):
    config = TrainDecoderConfig.from_dict(with_recipe(minimal_config, SAMPLE_EFFICIENT))
    assert config.recipe == SAMPLE_EFFICIENT
    assert config.decoder.options.get("predict_v") is True
    decoder = config.decoder.create()
    assert decoder.predict_v == [True] * len(decoder.unets)
    # The training loss and every sampler use the v objective of each U-Net.
    assert {decoder._objective(i) for i in range(len(decoder.unets))} == {"v"}
    # And nothing else: the config differs from the reference's in exactly the recipe's options.
    reference = TrainDecoderConfig.from_dict(minimal_config).to_dict()
    recipe = config.to_dict()
    assert recipe.pop("recipe") == SAMPLE_EFFICIENT and reference.pop("recipe") == "reference"
    assert recipe["decoder"].pop("predict_v") is True and reference["decoder"].pop("predict_v", False) is False
    assert recipe == reference


def test_an_option_the_config_sets_wins_over_the_recipe(minimal_config):
    raw = with_recipe(minimal_config, SAMPLE_EFFICIENT)
    raw["decoder"]["predict_v"] = False
    config = TrainDecoderConfig.from_dict(raw)
    assert config.decoder.options["predict_v"] is False
    assert config.decoder.create().predict_v == [False] * len(config.decoder.unets)


def test_a_resolved_config_reads_back_equal_and_the_caller_dict_is_untouched(minimal_config):
    raw = with_recipe(minimal_config, SAMPLE_EFFICIENT)
    before = copy.deepcopy(raw)
    config = TrainDecoderConfig.from_dict(raw)
    assert raw == before
    assert TrainDecoderConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", ["nope", 3, None])
def test_an_unknown_recipe_is_an_error_naming_the_key_and_the_choices(minimal_config, name):
    with pytest.raises(ConfigError) as caught:
        TrainDecoderConfig.from_dict(with_recipe(minimal_config, name))
    message = str(caught.value)
    assert "recipe: unknown recipe" in message and SAMPLE_EFFICIENT in message and "reference" in message


def test_a_malformed_section_is_left_to_its_own_check(minimal_config):
    raw = with_recipe(minimal_config, SAMPLE_EFFICIENT)
    raw["decoder"] = "not an object"
    filled, problems = apply_recipe(raw)
    assert problems == [] and filled["decoder"] == "not an object"
    with pytest.raises(ConfigError, match="decoder"):
        TrainDecoderConfig.from_dict(raw)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_gives_a_valid_config_with_each_of_its_options_applied(minimal_config, name):
    config = TrainDecoderConfig.from_dict(with_recipe(minimal_config, name)).to_dict()
    for path, value in RECIPES[name].items():
        section, option = path.split(".")
        assert config[section][option] == value, path


def test_a_run_with_a_recipe_says_so_at_start_and_trains_the_v_objective(tmp_path):
    from dalle2_decoder.training.loop import TrainingRun
    from dalle2_decoder.training.summary import summary_lines

    from .training_fixtures import tiny_config, write_tiny_demo

    raw = tiny_config(write_tiny_demo(tmp_path / "demo"), tmp_path / "run")
    raw["recipe"] = SAMPLE_EFFICIENT
    run = TrainingRun(TrainDecoderConfig.from_dict(raw))
    try:
        summary = summary_lines(run.config, run.accelerator, run.trainer, run.loaders)
        assert f"  recipe         {SAMPLE_EFFICIENT}: decoder.predict_v=true unless the config sets them" in summary
        assert run.trainer.decoder.predict_v == [True] * len(run.trainer.decoder.unets)
    finally:
        run.tracker.finish(success=True)
