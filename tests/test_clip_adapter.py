"""The CLIP adapter on a tiny open_clip model the test writes to disk (no download)."""

import pytest
import torch

from dalle2_decoder.clip import ClipEmbedder, ClipLoadError, create_clip, open_clip_name
from dalle2_decoder.config import ClipConfig

from .clip_fixtures import TINY_CONTEXT, TINY_EMBED_DIM, TINY_TEXT_WIDTH, write_tiny_open_clip
from .numerics import FEW_ROUNDINGS, assert_close_to_scale


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> ClipEmbedder:
    name = write_tiny_open_clip(tmp_path_factory.mktemp("tiny_clip"))
    return create_clip(ClipConfig(make="open_clip", model=name))


def test_image_embeddings_are_normalised_with_clip_dimension(tiny_clip):
    images = torch.rand(3, 3, 48, 40)  # any size: the adapter resizes and crops to CLIP's input
    embeds = tiny_clip.embed_images(images)
    assert embeds.shape == (3, TINY_EMBED_DIM) == (3, tiny_clip.image_embed_dim)
    assert torch.allclose(embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    # Different pictures give different embeddings; the same picture the same one.
    assert not torch.allclose(embeds[0], embeds[1])
    assert torch.allclose(tiny_clip.embed_images(images[:1]), embeds[:1], atol=1e-5)


def test_text_encodings_are_per_token_with_padding_mask(tiny_clip):
    captions = ["a red square", "a small blue circle on the left"]
    encoded = tiny_clip.embed_texts(captions)
    assert encoded.text_embed.shape == (2, TINY_EMBED_DIM)
    assert torch.allclose(encoded.text_embed.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert (
        encoded.text_encodings.shape
        == (2, TINY_CONTEXT, TINY_TEXT_WIDTH)
        == (2, tiny_clip.max_text_len, tiny_clip.text_embed_dim)
    )
    # Start token + words + end token are real; the longer caption has more real tokens.
    real = encoded.text_mask.sum(dim=1)
    assert real[1] > real[0] >= 3
    # Padding positions carry zeros, so they add nothing to cross-attention keys by accident.
    assert torch.all(encoded.text_encodings[~encoded.text_mask] == 0)


def test_clip_is_frozen_and_stays_in_eval_mode(tiny_clip):
    tiny_clip.train()
    assert not tiny_clip.training and not tiny_clip.model.training
    assert all(not p.requires_grad for p in tiny_clip.parameters())


def test_preprocess_resizes_to_clip_input_and_normalises(tiny_clip):
    pixels = tiny_clip.preprocess(torch.full((1, 3, 64, 96), 0.5))
    assert pixels.shape == (1, 3, tiny_clip.image_size, tiny_clip.image_size)
    expected = (0.5 - tiny_clip.mean) / tiny_clip.std
    # a resize of a constant (weights summing to 1 within a few roundings), then (x - mean) / std:
    # rounding relative to the terms, x / std and mean / std, not to their difference
    scale = float(((0.5 + tiny_clip.mean.abs()) / tiny_clip.std).max())
    assert_close_to_scale(pixels, expected.expand_as(pixels), ulps_of_scale=FEW_ROUNDINGS, scale=scale)


def test_openai_names_map_to_open_clip_registry():
    assert open_clip_name("openai", "ViT-L/14") == "ViT-L-14"
    assert open_clip_name("openai", "ViT-L/14@336px") == "ViT-L-14-336"
    assert open_clip_name("open_clip", "ViT-H-14") == "ViT-H-14"


def test_missing_weights_file_names_it(tmp_path):
    missing = tmp_path / "ViT-L-14.pt"
    with pytest.raises(ClipLoadError, match="ViT-L-14.pt"):
        create_clip(ClipConfig(make="openai", model="ViT-L/14", pretrained=str(missing)))


def test_open_clip_without_weights_is_refused():
    with pytest.raises(ClipLoadError, match="needs weights"):
        create_clip(ClipConfig(make="open_clip", model="ViT-B-32"))


def test_unknown_make_is_refused():
    with pytest.raises(ClipLoadError, match="unknown CLIP make"):
        create_clip(ClipConfig(make="mystery", model="ViT-B-32"))


@pytest.mark.slow
def test_failed_download_says_which_file_to_provide():
    # A fresh process with the hub client offline: the real download path runs and fails fast.
    import subprocess
    import sys

    code = (
        "from dalle2_decoder.clip import create_clip\n"
        "from dalle2_decoder.config import ClipConfig\n"
        "create_clip(ClipConfig(make='openai', model='ViT-B/32'))\n"
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode != 0
    assert "ClipLoadError" in result.stderr
    assert "download ViT-B-32.pt" in result.stderr and "decoder.clip.pretrained" in result.stderr


def test_missing_open_clip_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if the `clip` extra were not installed
    with pytest.raises(ClipLoadError, match=r"pip install dalle2-decoder\[clip\]"):
        create_clip(ClipConfig(make="open_clip", model="ViT-B-32", pretrained="x.pt"))


def test_loading_keeps_open_clip_progress_notes_out_of_the_log(tmp_path, caplog):
    import logging

    import open_clip

    name = write_tiny_open_clip(tmp_path / "clip")
    with caplog.at_level(logging.INFO):
        create_clip(ClipConfig(make="open_clip", model=name))
        loading = [record for record in caplog.records if "open_clip" in record.pathname]
        logging.getLogger("dalle2_decoder.test").info("the run's own line")
        # Outside create_clip open_clip's notes pass again: the same call, made directly, logs them.
        open_clip.get_tokenizer(name)
    assert loading == []
    assert "the run's own line" in caplog.messages
    assert any("open_clip" in record.pathname and record.levelno == logging.INFO for record in caplog.records)
