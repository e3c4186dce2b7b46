"""The shipped example configs and the accelerate configs (the SLURM script runs on a real cluster: test_slurm*.py)."""

from __future__ import annotations

import json
import warnings

import pytest

from dalle2_decoder.config import TrainDecoderConfig

from .conftest import REPO_ROOT

EXAMPLES = sorted((REPO_ROOT / "example_configs").glob("*.json"))
ACCELERATE_CONFIGS = sorted((REPO_ROOT / "accelerate_configs").glob("*.yaml"))


def test_the_examples_cover_each_use():
    assert {path.name for path in EXAMPLES} >= {
        "decoder_64_precomputed.json",
        "decoder_64_to_256_cascade.json",
        "upsampler_finetune.json",
        "decoder_clip_on_the_fly.json",
        "demo_cpu.json",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_config_loads_without_warnings(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = TrainDecoderConfig.from_json_path(path)
    assert TrainDecoderConfig.from_dict(config.to_dict()) == config  # the resolved form round-trips
    assert config.to_dict() == json.loads(json.dumps(config.to_dict()))


def test_example_specifics():
    load = TrainDecoderConfig.from_json_path
    cascade = load(REPO_ROOT / "example_configs/decoder_64_to_256_cascade.json")
    assert cascade.decoder.image_sizes == [64, 256] and len(cascade.decoder.unets) == 2
    finetune = load(REPO_ROOT / "example_configs/upsampler_finetune.json")
    assert finetune.train.unet_training_mask == [False, True]
    assert finetune.tracker.load is not None and finetune.tracker.load.load_from == "local"
    assert [finetune.train.trains_unet(number) for number in (1, 2)] == [False, True]
    on_the_fly = load(REPO_ROOT / "example_configs/decoder_clip_on_the_fly.json")
    assert on_the_fly.decoder.clip is not None and on_the_fly.data.img_embeddings_url is None
    demo = load(REPO_ROOT / "example_configs/demo_cpu.json")
    assert demo.train.device == "cpu" and demo.tracker.log.log_type == "tensorboard"
    assert demo.tracker.save[0].save_to == "local" and demo.data.num_workers == 1
    assert demo.decoder.unets[0].dim == 16 and tuple(demo.decoder.unets[0].dim_mults) == (1, 2, 4)
    # 16px (grids enlarge it): a quarter of the pixels of 32px (docs/RECIPE.md, "The demo with the recipe").
    assert demo.decoder.image_sizes == [16] and demo.data.preprocessing["Resize"] == {"size": 16}
    # The demo shows the product: the measured recipe (docs/RECIPE.md) and its paired error logged,
    # with a cosine learning-rate decay over the run and a short EMA.
    assert demo.recipe == "sample-efficient-v1" and demo.decoder.create().predict_v == [True]
    assert demo.train.lr_schedule == "cosine" and demo.train.warmup_steps == 50
    # An average over the last ~100 steps, not ~1,000 (update every 10): the reference's EMA lags a short run.
    assert demo.train.ema_update_every == 1
    # A U-Net step sized for 2 cores: a cross-attention sized to the tiny U-Net, one resnet block per
    # level, a 3x3 first convolution, and batches of 32 (each cheaper per sample than 16).
    unet = demo.decoder.create().unets[0]
    assert (unet.config["cross_attn_heads"], unet.config["cross_attn_dim_head"]) == (2, 16)
    assert (unet.config["num_resnet_blocks"], unet.config["init_conv_kernel_size"]) == (1, 3)
    assert demo.data.batch_size == 32
    # The noise schedule shifted to twice the noise (log-SNR - 2 log 2): the shapes' outlines are set
    # at high noise, where the shifted schedule spends more of training; the demo data draws them 1.5x.
    assert demo.to_dict()["decoder"]["noise_schedule_shift"] == 0.5
    # Few long epochs (the whole split cycled through), so that evaluation and grids cost little.
    assert demo.train.epochs * demo.train.epoch_samples == 44_800 and demo.train.epochs == 4
    # DPM-Solver++(2M) with 10 steps: at half DDIM-20's network calls, a lower paired error in
    # docs/RECIPE.md's sampler rows (3 seeds) and on the demo's own weights.
    resolved = demo.to_dict()["decoder"]
    assert (resolved["samplers"], resolved["sample_timesteps"]) == ("dpmpp_2m", 10)
    assert demo.evaluate.fidelity.enabled is True


def test_demo_config_matches_the_demo_data_generator():
    import inspect

    from dalle2_decoder.data.demo import generate_demo_dataset

    defaults = inspect.signature(generate_demo_dataset).parameters
    demo = TrainDecoderConfig.from_json_path(REPO_ROOT / "example_configs/demo_cpu.json")
    assert demo.decoder.unets[0].image_embed_dim == defaults["embed_dim"].default
    assert demo.data.shard_width == defaults["shard_width"].default
    assert demo.data.index_width == defaults["index_width"].default
    shards = -(-defaults["num_images"].default // defaults["shard_size"].default)
    assert demo.data.end_shard == shards - 1
    # `make demo-data` writes the shapes 1.5 times as large (see the Makefile), and data written at
    # another scale is written again: the stamp file names the scale.
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "DEMO_SHAPE_SCALE := 1.5" in makefile
    assert "--shape-scale $(DEMO_SHAPE_SCALE)" in makefile


def test_demo_reports_clip_similarity_with_the_clip_make_demo_data_fits():
    from dalle2_decoder.data.demo_clip import CONFIG_FILE, DemoClipSettings

    demo = TrainDecoderConfig.from_json_path(REPO_ROOT / "example_configs/demo_cpu.json")
    clip = demo.evaluate.fidelity.clip
    assert demo.evaluate.computes_fidelity and (clip.make, clip.model) == ("open_clip", "local-dir:./demo_data/clip")
    makefile = (REPO_ROOT / "Makefile").read_text()
    # `make demo-data` fits it into that folder, at the demo decoder's image size and the data's shape
    # scale and embedding size, and `make demo` needs it (the config file is written last).
    assert f"DEMO_CLIP := $(DEMO_DATA)/clip/{CONFIG_FILE}" in makefile
    command = next(line for line in makefile.splitlines() if "dalle2_decoder.data.demo_clip" in line).split()
    assert command[command.index("--out") + 1] == "$(DEMO_DATA)/clip"
    assert int(command[command.index("--image-size") + 1]) == demo.decoder.image_sizes[-1]
    assert command[command.index("--shape-scale") + 1] == "$(DEMO_SHAPE_SCALE)" and "--embed-dim" not in command
    assert DemoClipSettings().embed_dim == demo.decoder.unets[0].image_embed_dim
    assert "demo: $(INSTALLED) $(DEMO_STAMP) $(DEMO_CLIP)" in makefile
    assert "demo-data: $(DEMO_STAMP) $(DEMO_CLIP)" in makefile


def test_unet_and_decoder_options_round_trip_flat():
    config = TrainDecoderConfig.from_json_path(REPO_ROOT / "example_configs/decoder_64_to_256_cascade.json")
    resolved = config.to_dict()
    assert "options" not in resolved["decoder"] and "options" not in resolved["decoder"]["unets"][0]
    assert resolved["decoder"]["use_noise_for_lowres_cond"] is True
    assert resolved["decoder"]["unets"][1]["memory_efficient"] is True
    assert config.decoder.options == {"use_noise_for_lowres_cond": True}


def test_declared_fields_are_constructor_parameters():
    """The typed U-Net and Decoder fields must exist in the model constructors they are passed to."""
    import attrs

    from dalle2_decoder.config import DecoderConfig, UnetConfig
    from dalle2_decoder.config.structure import OPEN_CLASSES, constructor_parameters

    not_passed = {DecoderConfig: {"clip", "image_size", "options"}, UnetConfig: {"options"}}
    for cls in (UnetConfig, DecoderConfig):
        declared = {field.name for field in attrs.fields(cls)} - not_passed[cls]
        assert declared <= set(constructor_parameters(OPEN_CLASSES[cls]))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda path: path.name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))  # rejects unknown keys
    assert config.compute_environment.value == "LOCAL_MACHINE"
    assert config.num_processes >= 1 and config.num_machines >= 1
    assert config.main_training_function == "main"


def test_accelerate_configs_cover_each_setup():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {path.name: load_config_from_file(str(path)) for path in ACCELERATE_CONFIGS}
    assert configs["single_gpu.yaml"].distributed_type.value == "NO"
    assert configs["single_gpu.yaml"].num_processes == 1
    assert configs["multi_gpu.yaml"].distributed_type.value == "MULTI_GPU"
    assert configs["multi_node.yaml"].num_machines > 1
    # Launched through torchrun (one process per rank); see the comment in the file and the 2-process training test.
    assert configs["cpu_multi_process.yaml"].distributed_type.value == "MULTI_GPU"
    assert configs["cpu_multi_process.yaml"].use_cpu is True and configs["cpu_multi_process.yaml"].num_processes == 2
    assert configs["bf16.yaml"].mixed_precision == "bf16"
