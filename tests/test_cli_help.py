"""Every command's `--help` names the values its options take (samplers, log types, save targets, ...).

Each console command of setup.cfg, and each `python -m` tool, is run with `--help` through the
function its entry point names. The values looked for are written out here, and also taken from
the lists the code checks configs against, so a new sampler or logger must reach `--help` too.
"""

import configparser
import importlib

import pytest

from dalle2_decoder.config.choices import option_choices
from dalle2_decoder.config.decoder import CLIP_MAKES
from dalle2_decoder.models.samplers import SAMPLER_NAMES

from .conftest import REPO_ROOT

SAMPLERS = ["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "unipc_karras"]
CONFIG_CHOICES = {
    "tracker.log.log_type": ["console", "wandb", "tensorboard"],
    "tracker.load.load_from": ["local", "url", "wandb", "unet_sources"],
    "tracker.save[].save_to": ["local", "huggingface", "wandb"],
    "tracker.save[].save_type": ["checkpoint", "model"],
    "decoder.samplers": SAMPLERS,
    "decoder.clip.make": ["openai", "open_clip"],
    "train.mixed_precision": ["no", "fp16", "bf16"],
}


def console_scripts():
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")
    lines = [line.strip() for line in parser["options.entry_points"]["console_scripts"].splitlines()]
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines if line)


def help_of(target: str, capsys) -> str:
    """What `module:function` prints for `--help` (it exits 0)."""
    module, function = target.split(":")
    with pytest.raises(SystemExit) as exited:
        getattr(importlib.import_module(module), function)(["--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def unwrapped(text: str) -> str:
    return " ".join(text.split())


def option_entry(text: str, option: str) -> str:
    """The entry of `option` in a help text (argparse starts each at two spaces and a dash; the lines
    it wraps into are indented further), on one line."""
    lines = text.splitlines()
    (start,) = [index for index, line in enumerate(lines) if line.startswith(f"  {option}")]
    end = next((index for index in range(start + 1, len(lines)) if not lines[index].startswith("   ")), len(lines))
    return unwrapped("\n".join(lines[start:end]))


def test_the_console_commands_are_the_ones_checked_here():
    assert console_scripts() == {
        "dalle2-train-decoder": "dalle2_decoder.cli:main",
        "dalle2-evaluate-decoder": "dalle2_decoder.evaluate:main",
        "dalle2-convert-checkpoint": "dalle2_decoder.convert:main",
        "dalle2-sample-decoder": "dalle2_decoder.sample:main",
        "dalle2-report": "dalle2_decoder.report:main",
        "dalle2-posthoc-ema": "dalle2_decoder.posthoc_ema:main",
    }


@pytest.mark.parametrize("command", ["dalle2-train-decoder", "dalle2-evaluate-decoder"])
def test_commands_that_take_a_config_list_the_values_of_every_config_option_with_a_fixed_set(command, capsys):
    text = unwrapped(help_of(console_scripts()[command], capsys))
    for option, values in CONFIG_CHOICES.items():
        assert f"{option} {', '.join(values)}" in text, option
    for option, values in option_choices():  # and whatever the code accepts beyond the values above
        assert f"{option} {', '.join(values)}" in text, option


def test_the_sampling_command_names_its_samplers_and_clip_makes(capsys):
    text = help_of(console_scripts()["dalle2-sample-decoder"], capsys)
    for values in (SAMPLERS, SAMPLER_NAMES):
        assert ", ".join(values) in option_entry(text, "--sampler NAME")
    for values in (["openai", "open_clip"], CLIP_MAKES):
        assert ", ".join(values) in option_entry(text, "--clip_make")


@pytest.mark.parametrize("command", ["dalle2-convert-checkpoint", "dalle2-report", "dalle2-posthoc-ema"])
def test_commands_without_a_fixed_set_of_values_still_answer_help(command, capsys):
    text = help_of(console_scripts()[command], capsys)
    assert text.startswith(f"usage: {command}")


def test_the_data_preparation_tool_names_its_clip_makes(capsys):
    text = help_of("dalle2_decoder.data.prepare:main", capsys)
    for values in (["openai", "open_clip"], CLIP_MAKES):
        assert "{" + ",".join(values) + "}" in option_entry(text, "--clip-make")
    assert "usage: python -m dalle2_decoder.data.demo" in help_of("dalle2_decoder.data.demo:main", capsys)
    demo_clip = help_of("dalle2_decoder.data.demo_clip:main", capsys)
    assert demo_clip.startswith("usage: python -m dalle2_decoder.data.demo_clip") and "--image-size" in demo_clip
