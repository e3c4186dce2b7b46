"""A `model` save, loaded into a freshly created decoder, samples like the decoder it was saved from."""

import importlib
import json

import pytest
import torch

from dalle2_decoder.config import ConsoleLogConfig, DecoderConfig, LocalSaveConfig, TrackerConfig, UnetConfig
from dalle2_decoder.loading import load_model_weights
from dalle2_decoder.tracking import CheckpointMismatchError, create_tracker

from .conftest import TINY_UNET_OPTIONS

EMBED = 8


pytestmark = pytest.mark.usefixtures("compute_threads")


def decoder_config(dim=8) -> DecoderConfig:
    unet = UnetConfig(dim=dim, image_embed_dim=EMBED, dim_mults=(1, 2), options=TINY_UNET_OPTIONS)
    # cosine throughout: the default linear schedule of the last U-Net needs more than 20 timesteps.
    return DecoderConfig(unets=[unet, unet], image_sizes=[8, 16], timesteps=10, beta_schedule="cosine")


# load_model_weights is offered by dalle2_decoder.tracking (where callers first found it) and by
# dalle2_decoder.loading (beside load_decoder): each place is used by one case.
@pytest.mark.parametrize(
    "file_name, offered_by",
    [("decoder.safetensors", "dalle2_decoder.loading"), ("decoder.pt", "dalle2_decoder.tracking")],
)
def test_model_save_loads_into_a_fresh_decoder_that_samples(tmp_path, file_name, offered_by):
    load_model_weights = importlib.import_module(offered_by).load_model_weights
    torch.manual_seed(0)
    trained = decoder_config().create()
    with torch.no_grad():  # stand-in for training (and EMA): weights that no fresh decoder has
        for parameter in trained.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)

    config = TrackerConfig(
        log=ConsoleLogConfig(log_type="console"),
        save=[LocalSaveConfig(save_to="local", save_latest_to=file_name, save_type="model")],
        data_path=str(tmp_path / "run"),
    )
    tracker = create_tracker(config, full_config_dict={"decoder": {"image_sizes": [8, 16]}}, is_main_process=True)
    tracker.save(step=100, model_state=trained.state_dict)  # a function: called because a saver needs it
    tracker.finish()

    torch.manual_seed(1)
    fresh = decoder_config().create()
    assert not torch.equal(fresh.unets[0].to_out.weight, trained.unets[0].to_out.weight)
    loaded = load_model_weights(fresh, tmp_path / "run" / file_name)
    assert loaded.step == 100 and json.loads(loaded.config_json)["decoder"]["image_sizes"] == [8, 16]
    for name, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name

    image_embed = torch.randn(2, EMBED)
    images = fresh.sample(image_embed=image_embed, cond_scale=1.0, seed=3)
    assert images.shape == (2, 3, 16, 16)
    assert images.min() >= 0 and images.max() <= 1 and torch.isfinite(images).all()
    assert torch.equal(images, trained.sample(image_embed=image_embed, cond_scale=1.0, seed=3))


def test_a_save_from_another_decoder_config_names_the_mismatched_tensors(tmp_path):
    config = TrackerConfig(
        log=ConsoleLogConfig(log_type="console"),
        save=[LocalSaveConfig(save_to="local", save_latest_to="decoder.safetensors", save_type="model")],
        data_path=str(tmp_path / "run"),
    )
    tracker = create_tracker(config, full_config_dict={}, is_main_process=True)
    tracker.save(step=1, model_state=decoder_config(dim=8).create().state_dict())
    tracker.finish()

    wider = decoder_config(dim=16).create()
    with pytest.raises(CheckpointMismatchError) as error:
        load_model_weights(wider, tmp_path / "run" / "decoder.safetensors")
    message = str(error.value)
    assert "decoder.safetensors does not fit the configured model" in message
    assert "shape mismatch" in message and "by module: unets.0 (" in message and "unets.1 (" in message
    assert error.value.mismatched and not error.value.missing and not error.value.unexpected
