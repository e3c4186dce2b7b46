"""CLIP on the fly in the training run: embeddings and text encodings for data that has none."""

import copy

import pytest
import torch

from dalle2_decoder.config import TrainDecoderConfig
from dalle2_decoder.tracking import read_file
from dalle2_decoder.training import TrainingRun

from .clip_fixtures import TINY_EMBED_DIM, TINY_TEXT_WIDTH, write_tiny_open_clip
from .numerics import NETWORK, assert_close_to_scale
from .training_fixtures import EMBED_DIM, tiny_config, write_tiny_demo


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    return write_tiny_open_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_tiny_demo(tmp_path_factory.mktemp("demo"))


def clip_config(data, data_path, clip_model, *, keep_embeddings: bool):
    data = copy.deepcopy(data)
    if not keep_embeddings:  # shards with images and captions only
        data.pop("img_embeddings_url")
        data.pop("text_embeddings_url")
    config = tiny_config(data, data_path, epochs=1, epoch_samples=8, validation_samples=4)
    unet = config["decoder"]["unets"][0]
    if keep_embeddings:  # the data's own embeddings (pooled text: one token) condition the U-Net
        unet.update(cond_on_text_encodings=True, text_embed_dim=EMBED_DIM)
    else:
        unet.update(image_embed_dim=TINY_EMBED_DIM, cond_on_text_encodings=True, text_embed_dim=TINY_TEXT_WIDTH)
    config["decoder"]["clip"] = {"make": "open_clip", "model": clip_model}
    config["tracker"]["save"] = [{"save_to": "local", "save_latest_to": "latest.pth"}]
    return TrainDecoderConfig.from_dict(config)


@pytest.mark.slow
def test_training_on_data_without_embeddings_uses_clip(demo_data, clip_model, tmp_path):
    run = TrainingRun(clip_config(demo_data, tmp_path / "run", clip_model, keep_embeddings=False))
    seen = []
    original_step = run.trainer.train_step

    def recording_step(batch):
        seen.append(batch)
        return original_step(batch)

    run.trainer.train_step = recording_step
    assert run.execute() == 0
    clip = run.batches.clip
    assert clip is not None and not clip.training
    # Image embeddings and per-token text encodings came from CLIP, for the very images and captions.
    batch = seen[0]
    # (the same CLIP on the same batch; the run chose its own thread count, which splits reductions)
    assert_close_to_scale(batch["image_embed"], clip.embed_images(batch["image"]), ulps_of_scale=NETWORK)
    assert batch["text_encodings"].shape[-1] == TINY_TEXT_WIDTH and batch["text_mask"].dtype == torch.bool
    text_encodings = clip.embed_texts(batch["caption"]).text_encodings
    assert_close_to_scale(batch["text_encodings"], text_encodings, ulps_of_scale=NETWORK, what="text")
    # CLIP stays out of the decoder's checkpoint and optimizers, and is frozen.
    state = read_file(tmp_path / "run" / "latest.pth").state["trainer"]
    assert not any("clip" in name or name.startswith("model.") for name in state["decoder"])
    optimized = {id(p) for group in run.trainer.optimizers[1].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in clip.parameters()}
    assert all(not p.requires_grad for p in clip.parameters())


@pytest.mark.slow
def test_clip_is_never_loaded_when_the_data_has_embeddings(demo_data, clip_model, tmp_path):
    run = TrainingRun(clip_config(demo_data, tmp_path / "run", clip_model, keep_embeddings=True))
    assert run.execute() == 0
    assert run.batches.clip is None


def test_clip_that_does_not_fit_the_unets_is_a_clear_error(demo_data, clip_model, tmp_path):
    from dalle2_decoder.clip import ClipLoadError

    config = clip_config(demo_data, tmp_path / "run", clip_model, keep_embeddings=False).to_dict()
    config["decoder"]["unets"][0]["image_embed_dim"] = 48
    run = TrainingRun(TrainDecoderConfig.from_dict(config))
    with pytest.raises(
        ClipLoadError, match="16-dimensional image embeddings but decoder.unets\\[0\\].image_embed_dim is 48"
    ):
        run.execute()
