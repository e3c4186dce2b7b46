"""`load_decoder`: a ready decoder from a local file, a folder, a URL or a hub repo written by the saver."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import constants as hub_constants

from dalle2_decoder import load_decoder
from dalle2_decoder.config import HuggingfaceSaveConfig, TrainDecoderConfig
from dalle2_decoder.loading import DecoderLoadError, load
from dalle2_decoder.tracking import read_file
from dalle2_decoder.tracking.savers import HuggingfaceSaver, SaveFile

from .sampling_fixtures import train_tiny_run
from .tracking_servers import FileServer, HubServer

TOKEN = "hf_test_token_loading_0123"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("load"), samplers="dpmpp_2m", sample_timesteps=3)


@pytest.fixture(autouse=True)
def no_ambient_hub_login(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))


def ema_weights(checkpoint):
    ema = read_file(checkpoint).state["trainer"]["emas"]["1"]
    return {name[len("averaged.") :]: value for name, value in ema.items() if name.startswith("averaged.")}


def assert_unet_weights(decoder, expected):
    state = decoder.unets[0].state_dict()
    assert set(state) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_a_model_save_loads_with_its_recorded_config(run):
    loaded = load(run["model"])
    decoder = loaded.decoder
    assert not decoder.training and loaded.weights == "model" and loaded.step == 8
    assert decoder.sampler_for(1) == ("dpmpp_2m", 3)  # the config came from the file's metadata
    assert loaded.config["decoder"]["samplers"] == "dpmpp_2m"
    # the same weights as building the decoder from the config file and loading the save by hand
    reference = TrainDecoderConfig.from_dict(run["config"]).decoder.create()
    reference.load_state_dict(read_file(run["model"]).model_state)
    reference.eval()
    embed = torch.randn(2, 32)
    samples = reference.sample(image_embed=embed, seed=1)  # the same weights and computation: exactly
    torch.testing.assert_close(decoder.sample(image_embed=embed, seed=1), samples, rtol=0, atol=0)


def test_a_checkpoint_gives_its_ema_weights_unless_asked_otherwise(run):
    expected = ema_weights(run["checkpoint"])
    loaded = load(run["checkpoint"])
    assert loaded.weights == "ema"
    assert_unet_weights(loaded.decoder, expected)
    trained = load(run["checkpoint"], use_ema=False)
    assert trained.weights == "trained"
    raw = read_file(run["checkpoint"]).state["trainer"]["decoder"]
    assert_unet_weights(trained.decoder, {k[len("unets.0.") :]: v for k, v in raw.items() if k.startswith("unets.0.")})
    assert any(not torch.equal(expected[k], raw[f"unets.0.{k}"]) for k in expected)  # EMA differs from trained


def test_a_url_is_downloaded_once_into_the_cache(run, tmp_path):
    with FileServer(run["root"] / "run") as server:
        decoder = load_decoder(f"{server.url}/model.safetensors", cache_dir=tmp_path / "cache")
    assert_unet_weights(decoder, ema_weights(run["checkpoint"]))
    assert len(list((tmp_path / "cache").rglob("model.safetensors"))) == 1
    # the server is gone: the cached copy serves
    again = load_decoder(f"{server.url}/model.safetensors", cache_dir=tmp_path / "cache")
    assert_unet_weights(again, ema_weights(run["checkpoint"]))
    with FileServer(run["root"] / "run") as server:
        with pytest.raises(DecoderLoadError, match="HTTP 404"):
            load_decoder(f"{server.url}/missing.safetensors", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    "save_type, dest, lfs", [("model", "decoder.safetensors", False), ("checkpoint", "checkpoints/latest.pt", True)]
)
def test_a_hub_repo_written_by_the_saver_loads_by_its_id(run, tmp_path, monkeypatch, save_type, dest, lfs):
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)  # the loopback hub speaks LFS, not Xet
    source = run["model"] if save_type == "model" else run["checkpoint"]
    with HubServer(tmp_path / "hub", token=TOKEN, lfs=lfs) as hub:
        config = HuggingfaceSaveConfig(
            save_to="huggingface",
            huggingface_repo="team/tiny-decoder",
            huggingface_endpoint=hub.url,
            save_latest_to=dest,
            save_type=save_type,
        )
        HuggingfaceSaver(config, TOKEN).put([SaveFile(source, dest)], step=8)

        repo = hub.root / "team" / "tiny-decoder"
        card = json.loads((repo / "config.json").read_text())
        assert card["weights"] == dest and card["save_type"] == save_type and card["step"] == 8
        assert card["config"]["decoder"]["samplers"] == "dpmpp_2m"
        readme = (repo / "README.md").read_text()
        assert "library_name: dalle2_decoder" in readme and 'load_decoder("team/tiny-decoder")' in readme
        assert len(hub.commits) == 1  # weights, config.json and the card in one commit
        assert hub.validated_metadata[-1]["library_name"] == "dalle2_decoder"  # valid YAML front matter

        loaded = load("team/tiny-decoder", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache")
        assert loaded.source == f"hub repo team/tiny-decoder ({dest})"
        assert_unet_weights(loaded.decoder, ema_weights(run["checkpoint"]))
        assert ("HEAD", f"/team/tiny-decoder/resolve/main/{dest}") in hub.requests

        with pytest.raises(DecoderLoadError, match="hub repo team/nothing-here not found"):
            load_decoder("team/nothing-here", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache")


def test_bad_sources_fail_with_one_clear_message(run, tmp_path):
    with pytest.raises(DecoderLoadError, match="no such file or folder, and not an http"):
        load_decoder(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.ones(2)}, plain)
    with pytest.raises(DecoderLoadError, match="records no configuration"):
        load_decoder(plain)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DecoderLoadError, match="folder without config.json"):
        load_decoder(tmp_path / "folder")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DecoderLoadError, match="garbage.pt.*not a PyTorch checkpoint file"):
        load_decoder(garbage)
