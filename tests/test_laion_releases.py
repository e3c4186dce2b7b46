"""LAION's released decoders (tests/fixtures/laion/README.md): their published configs load unchanged,
and build the U-Nets of the releases they were trained with, parameter for parameter (counted by
those releases themselves) and byte for byte against the sizes of the released weights. The
weights themselves cannot be downloaded here."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import warnings
from pathlib import Path
from typing import Dict, Iterator, Optional

import pytest
import torch
from safetensors.torch import load_file

from dalle2_decoder import cli
from dalle2_decoder.config import ConfigWarning, TrainDecoderConfig
from dalle2_decoder.loading import load_model_weights
from dalle2_decoder.models import Unet
from dalle2_decoder.tracking import CheckpointError

from .numerics import assert_close_to_scale, scale_of
from .test_reference_releases import ULPS_OF_SCALE

FIXTURES = Path(__file__).parent / "fixtures" / "laion"
SHRUNK = (
    Path(__file__).parent / "fixtures" / "reference" / "laion"
)  # written by scripts/reference_fixtures/laion_cases.py
SHRUNK_RELEASES = sorted(p.name for p in SHRUNK.iterdir() if (p / "meta.json").is_file())
PUBLISHED = json.loads((FIXTURES / "published.json").read_text())
DECODERS: Dict[str, dict] = PUBLISHED["decoders"]
FULL_CONFIG = FIXTURES / "1.5B_laion2B" / "decoder_config.json"

# What the reference-era options of the published file give (each ignored, and said so).
EXPECTED_WARNINGS = [
    *(
        f"train.{name}: a flag of the reference's saver config, which DALLE2-pytorch ignores under train; ignored "
        "here too"
        for name in ("save_all", "save_latest", "save_best")
    ),
    "tracker.log.wandb_resume: false: an option of DALLE2-pytorch before 0.23 (later releases ignore it; resume took "
    "its place); ignored",
    "tracker.save[0]: saves nothing (no save_latest_to, save_best_to or save_meta_to), left out of the run; "
    "DALLE2-pytorch before 0.26.2 saved latest.pth and best.pth there by default: set save_latest_to and "
    "save_best_to to save there",
]


def test_the_published_1_5B_laion2B_config_loads_unchanged():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = TrainDecoderConfig.from_json_path(FULL_CONFIG)
    assert sorted(str(w.message) for w in caught if issubclass(w.category, ConfigWarning)) == sorted(EXPECTED_WARNINGS)
    unet = config.decoder.unets[0]
    assert (unet.dim, unet.image_embed_dim, unet.dim_mults) == (320, 768, (1, 2, 3, 4))
    assert unet.options["cond_dim"] == 512 and unet.options["self_attn"] == [False, True, True, True]
    assert list(config.decoder.image_sizes) == [64] and config.decoder.clip.model == "ViT-L/14"
    assert [saver.save_latest_to for saver in config.tracker.save] == [None, "decoder/1.5B_laion2B/latest.pth"]


def test_the_check_command_accepts_it(capsys):
    code = cli.main(["--config_file", str(FULL_CONFIG), "--check", "--no-io"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(err.splitlines()) == sorted(f"warning: {w}" for w in EXPECTED_WARNINGS)
    assert json.loads(out)["decoder"]["unets"][0]["dim"] == 320


@contextlib.contextmanager
def unets_on_meta() -> Iterator[None]:
    """U-Nets built on the meta device (shapes only: a 1B-parameter U-Net takes no memory)."""
    real = Unet.__init__

    @functools.wraps(real)  # keeps the signature, which the config checks options against
    def on_meta(self, *args, **kwargs):
        with torch.device("meta"):
            real(self, *args, **kwargs)

    Unet.__init__ = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        Unet.__init__ = real  # type: ignore[method-assign]


@functools.lru_cache(maxsize=None)
def unet_parameters(name: str, release: Optional[str]) -> int:
    """The U-Net count of decoder `name` built here from its published config, as `release` built it (None: 1.15.6)."""
    raw = json.loads(FULL_CONFIG.read_text())
    raw["decoder"] = copy.deepcopy(json.loads((FIXTURES / DECODERS[name]["config"]).read_text())["decoder"])
    for unet in raw["decoder"]["unets"]:
        if release is not None:
            unet["reference_release"] = release
    with warnings.catch_warnings(), unets_on_meta():
        warnings.simplefilter("ignore", ConfigWarning)
        decoder = TrainDecoderConfig.from_dict(raw).decoder.create()
    assert len(decoder.unets) == 1
    return sum(p.numel() for p in decoder.unets[0].parameters())


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_a_published_config_builds_the_u_net_of_its_release_parameter_for_parameter(name):
    published = DECODERS[name]
    release = published["release"]
    assert unet_parameters(name, release) == published["parameters"][release]  # counted by that release
    assert unet_parameters(name, None) == published["parameters"]["1.15.6"]  # the same JSON in 1.15.6


@pytest.mark.parametrize("name", sorted(n for n in DECODERS if "named_parameters" in DECODERS[n]))
def test_the_names_count_the_decoder_with_its_clip(name):
    """ "1.5B" and "1B": the U-Net of 0.15.4 and CLIP ViT-L/14 (the decoder's count then), to half a billion."""
    published = DECODERS[name]
    unet = unet_parameters(name, published["release"])
    with_clip = unet + PUBLISHED["clip_vit_l_14_parameters"]
    assert round(2 * with_clip / 1e9) / 2 == published["named_parameters"] / 1e9
    assert round(2 * unet / 1e9) / 2 != published["named_parameters"] / 1e9  # the U-Net alone is not what is named


def test_the_released_weights_are_the_size_of_their_release_s_u_net():
    """v1.0.2's model save holds its U-Net in float32 and little else: 4 bytes a parameter of 1.0.2's U-Net."""
    published = DECODERS["v1.0.2"]
    size = published["weights_bytes"]
    overhead = size - 4 * unet_parameters("v1.0.2", "1.0.2")
    assert 0 <= overhead <= 1e-4 * size  # names, the recorded config, the zip records
    assert size - 4 * unet_parameters("v1.0.2", None) > 0.02 * size  # 1.15.6's U-Net is 26M parameters smaller
    assert size - 4 * unet_parameters("v1.0.2", "0.15.4") < 0  # 0.15.4's does not fit in the file


@pytest.mark.parametrize("large", ["1.5B", "1.5B_laion2B"])
def test_the_0_15_4_files_differ_by_their_u_nets(large):
    """The 0.15.4 model saves hold the same CLIP beside their U-Net, so their sizes differ by 4 bytes a parameter
    of 0.15.4's U-Nets (and its LayerNorm buffers); 1.15.6's U-Nets would leave 74 MB unexplained."""
    small = "small_32gpus"
    published_difference = DECODERS[large]["weights_bytes"] - DECODERS[small]["weights_bytes"]

    def difference(release: Optional[str]) -> int:
        return 4 * (unet_parameters(large, release) - unet_parameters(small, release))

    assert abs(published_difference - difference("0.15.4")) <= 1e-3 * published_difference
    assert abs(published_difference - difference(None)) > 0.05 * published_difference


def test_every_release_of_the_published_decoders_has_a_shrunk_fixture():
    """0.15.4 for the 1.5B and 1B decoders; 1.0.3 (1.0.2's model code, 1.0.2 is not on PyPI) for v1.0.2."""
    assert SHRUNK_RELEASES == ["0.15.4", "1.0.3"]
    assert {d["release"] for d in DECODERS.values()} == {"0.15.4", "1.0.2"}


@pytest.mark.usefixtures("compute_threads")
@pytest.mark.parametrize("release", SHRUNK_RELEASES)
def test_the_published_decoder_shrunk_samples_what_its_release_samples(release):
    """The published U-Net options (sparse and memory-efficient attention, self-attention per level, text
    conditioning, learned variance) at a small size: the release's own Decoder state dict, loaded into the
    decoder built here as that release's, samples the release's images with guidance 1.7."""
    meta = json.loads((SHRUNK / release / "meta.json").read_text())
    raw = json.loads(FULL_CONFIG.read_text())
    raw["decoder"] = json.loads((SHRUNK / release / "config.json").read_text())["decoder"]
    tensors = load_file(SHRUNK / release / "samples.safetensors")
    noise = [tensors[f"noise.{i}"] for i in range(meta["num_noise"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        as_1_15_6 = TrainDecoderConfig.from_dict(raw).decoder.create()
        for unet in raw["decoder"]["unets"]:
            unet["reference_release"] = release
        decoder = TrainDecoderConfig.from_dict(raw).decoder.create()
    with pytest.raises(CheckpointError):  # 1.15.6's U-Net has other layers (the weights do not fit)
        load_model_weights(as_1_15_6, SHRUNK / release / "model.pth")
    load_model_weights(decoder, SHRUNK / release / "model.pth")
    decoder.eval()
    with torch.no_grad():
        images = decoder.sample(
            tensors["image_embed"], text_encodings=tensors["text_encodings"], cond_scale=meta["cond_scale"], noise=noise
        )
    expected = tensors["images"]
    assert images.shape == expected.shape
    # float32 networks over 16 steps: the bound of tests/test_reference_releases.py
    assert_close_to_scale(images, expected, ulps_of_scale=ULPS_OF_SCALE, scale=max(1.0, scale_of(expected)))


@pytest.mark.usefixtures("compute_threads")
def test_the_documented_route_for_a_0_15_4_file_converts_it_once(tmp_path, capsys):
    """docs/MIGRATING.md: the published config with reference_release 0.15.4, given to dalle2-convert-checkpoint
    with the bare state dict; the model save it writes then loads with nothing else."""
    from dalle2_decoder.convert import main
    from dalle2_decoder.loading import load_decoder

    release = "0.15.4"
    meta = json.loads((SHRUNK / release / "meta.json").read_text())
    raw = json.loads(FULL_CONFIG.read_text())
    raw["decoder"] = json.loads((SHRUNK / release / "config.json").read_text())["decoder"]
    raw["decoder"]["unets"][0]["reference_release"] = release
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    out = tmp_path / "laion.safetensors"
    assert main([str(SHRUNK / release / "model.pth"), str(out), "--config_file", str(tmp_path / "cfg.json")]) == 0
    capsys.readouterr()
    decoder = load_decoder(out)
    tensors = load_file(SHRUNK / release / "samples.safetensors")
    noise = [tensors[f"noise.{i}"] for i in range(meta["num_noise"])]
    with torch.no_grad():
        images = decoder.sample(
            tensors["image_embed"], text_encodings=tensors["text_encodings"], cond_scale=meta["cond_scale"], noise=noise
        )
    expected = tensors["images"]
    assert_close_to_scale(images, expected, ulps_of_scale=ULPS_OF_SCALE, scale=max(1.0, scale_of(expected)))
