"""Each rule of the decoder's settings is stated once: the config check and the constructor the
rule guards refuse the same values in the same words; only the option's path differs
(`decoder.sample_timesteps[1]` in a config, `sample_timesteps[1]` given to the constructor)."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
from torch import nn

from dalle2_decoder.config.train import EMA_WARMUPS
from dalle2_decoder.models.decoder import Decoder
from dalle2_decoder.models.schedules import BETA_SCHEDULES, make_beta_schedule
from dalle2_decoder.training.ema import EMA, ema_decay

from .conftest import TINY_UNET_OPTIONS
from .test_models_decoder import EMBED, tiny_unet

pytestmark = pytest.mark.usefixtures("compute_threads")

BASE: Dict[str, Any] = {"image_sizes": [16, 32], "timesteps": 20, "beta_schedule": "cosine"}
"""Two tiny U-Nets that both the config and the constructor accept."""


def cascade_config(minimal_config: dict, settings: Dict[str, Any]) -> dict:
    unet = {"dim": 8, "image_embed_dim": EMBED, "dim_mults": [1, 2], **TINY_UNET_OPTIONS}
    minimal_config["decoder"] = {"unets": [dict(unet), dict(unet)], **BASE, **settings}
    return minimal_config


def without_section(problem: str) -> str:
    """A config problem with the `decoder` section taken out of its paths, as the constructor names them."""
    return problem.removeprefix("decoder: ").replace("decoder.", "")


def constructor_problems(error: BaseException, owner: str) -> List[str]:
    return [line.removeprefix(f"{owner}: ") for line in str(error).splitlines()]


@pytest.mark.parametrize(
    "settings",
    [
        {"image_sizes": [32, 16]},
        {"image_sizes": [16]},
        {"sample_timesteps": [None, 30]},
        {"sample_timesteps": 0},
        {"samplers": ["ddim", "dpm"]},
        {"loss_type": "hubr"},
        {"beta_schedule": ["cosine", "cosin"]},
        {"beta_schedule": "linear", "timesteps": 10},
        {"beta_schedule": None, "timesteps": 10},
        {"use_blur_for_lowres_cond": False},
        {"use_noise_for_lowres_cond": [True, True]},
        {"use_blur_for_lowres_cond": [True, True, True]},
    ],
    ids=lambda settings: ",".join(f"{k}={v}" for k, v in settings.items()),
)
def test_the_config_and_the_decoder_refuse_a_setting_in_the_same_words(minimal_config, config_problems, settings):
    problems = config_problems(cascade_config(minimal_config, settings))
    assert problems, "the config check accepted it"
    with pytest.raises(ValueError) as refused:
        Decoder([tiny_unet(), tiny_unet()], **{**BASE, **settings})
    assert constructor_problems(refused.value, "Decoder") == [without_section(problem) for problem in problems]


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_the_config_accepts_exactly_the_image_sizes_the_unet_runs_at(minimal_config, config_problems, memory_efficient):
    unet = tiny_unet(dim_mults=(1, 2, 4), memory_efficient=memory_efficient).eval()
    runs_at = []
    for size in range(8, 41):
        minimal_config["decoder"] = {
            "unets": [
                {"dim": 8, "image_embed_dim": EMBED, "dim_mults": [1, 2, 4], "memory_efficient": memory_efficient}
            ],
            "image_sizes": [size],
        }
        problems = [p for p in config_problems(minimal_config) if p.startswith("decoder.image_sizes[0]:")]
        try:
            with torch.no_grad():
                unet(torch.zeros(1, 3, size, size), torch.zeros(1, dtype=torch.long))
        except ValueError as error:
            # the config names the U-Net by its number, the U-Net itself has none
            (problem,) = problems
            reason = problem.removeprefix("decoder.image_sizes[0]: ").replace("U-Net 1", "this U-Net")
            assert constructor_problems(error, "Unet") == [f"image height: {reason}", f"image width: {reason}"]
        else:
            assert problems == []
            runs_at.append(size)
    assert runs_at == ([8, 16, 24, 32, 40] if memory_efficient else list(range(8, 41, 4)))


@pytest.mark.parametrize("timesteps", [1, 2, 19, 20, 21])
def test_the_config_refuses_exactly_the_schedules_that_reach_a_beta_of_one(minimal_config, config_problems, timesteps):
    """linear and quadratic end at 20 / T, sigmoid just below it: T = 20 and 19 are the edges."""
    for name in BETA_SCHEDULES:
        minimal_config["decoder"].update(beta_schedule=name, timesteps=timesteps)
        problems = config_problems(minimal_config)
        try:
            make_beta_schedule(name, timesteps)
        except ValueError as error:
            assert constructor_problems(error, "make_beta_schedule") == [without_section(p) for p in problems]
        else:
            assert problems == [], name


def test_the_ema_and_the_config_refuse_the_same_decay_in_the_same_words(minimal_config, config_problems):
    minimal_config["train"] = {"ema_beta": 1.5}
    assert config_problems(minimal_config) == ["train.ema_beta: must be in [0.0, 1.0] (got 1.5)"]
    with pytest.raises(ValueError) as refused:
        EMA(nn.Linear(2, 2), 1.5)
    assert constructor_problems(refused.value, "EMA") == ["beta: must be in [0.0, 1.0] (got 1.5)"]


def test_the_ema_and_the_config_refuse_the_same_warmups_in_the_same_words(minimal_config, config_problems):
    network = nn.Linear(2, 2)
    for warmup in EMA_WARMUPS:
        minimal_config["train"] = {"ema_warmup": warmup}
        assert config_problems(minimal_config) == []
        EMA(network, 0.99, warmup=warmup)
    minimal_config["train"] = {"ema_warmup": "pow"}
    (problem,) = config_problems(minimal_config)
    reason = problem.removeprefix("train.ema_warmup: ")
    assert reason.startswith('unknown value "pow" (did you mean power?)')
    with pytest.raises(ValueError) as refused:
        EMA(network, 0.99, warmup="pow")
    assert constructor_problems(refused.value, "EMA") == [f"warmup: {reason}"]
    # before the EMA's first update too (the decay is 0 then whatever the warm-up)
    with pytest.raises(ValueError) as refused:
        ema_decay(0, beta=0.99, warmup="pow")
    assert constructor_problems(refused.value, "ema_decay") == [f"warmup: {reason}"]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_schedule_rule_holds_when_the_decoder_is_built_on_the_meta_device(schedule):
    """Preflight sizes a checkpoint from a decoder built on the meta device, where tensors have no
    values: the rule's own check of the betas must still run (on the CPU) and refuse alike."""
    from dalle2_decoder.config import DecoderConfig, UnetConfig
    from dalle2_decoder.preflight import estimated_checkpoint_bytes

    unet = UnetConfig(dim=8, image_embed_dim=16, dim_mults=(1, 2))
    config = DecoderConfig(unets=[unet], image_sizes=[16], timesteps=40, beta_schedule=schedule)
    with torch.device("meta"):
        decoder = config.create()
    params = sum(p.numel() for p in decoder.parameters())
    assert params > 0 and all(p.is_meta for p in decoder.parameters())

    class Run:  # the two parts of a run config the estimate reads
        decoder = config
        train = type("Train", (), {"use_ema": True})

    assert estimated_checkpoint_bytes(Run) == params * 4 * 4
    if schedule == "linear":
        with torch.device("meta"), pytest.raises(ValueError, match="betas of 1 or more"):
            DecoderConfig(unets=[unet], image_sizes=[16], timesteps=10, beta_schedule=schedule).create()
