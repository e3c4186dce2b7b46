"""The demo's CLIP (dalle2_decoder/data/demo_clip.py): fitted to the demo embeddings, loaded as a local CLIP."""

from __future__ import annotations

import json

import pytest
import torch

from dalle2_decoder.clip import create_clip
from dalle2_decoder.config.decoder import ClipConfig
from dalle2_decoder.data import demo, demo_clip
from dalle2_decoder.evaluation.fidelity import clip_similarity

# Small enough to fit in seconds on 2 cores, large enough to tell pictures apart.
QUICK = demo_clip.DemoClipSettings(num_images=1024, epochs=6, batch_size=32, width=64, layers=1, held_out=64)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo-clip")
    report = demo_clip.fit_demo_clip(str(folder), QUICK, log=lambda line: None)
    return folder, report


def _mean_cosines(clip, images, embeddings):
    """Mean CLIP similarity of each picture to its own embedding, and to the other pictures' (all pairs)."""
    own = clip_similarity(clip, images, embeddings).mean()
    others = [clip_similarity(clip, images, embeddings.roll(shift, dims=0)).mean() for shift in range(1, len(images))]
    return float(own), float(torch.stack(others).mean())


def test_the_fitted_clip_loads_as_a_local_clip_and_scores_a_picture_by_its_own_embedding(fitted):
    folder, report = fitted
    clip = create_clip(ClipConfig(make="open_clip", model=f"local-dir:{folder}"), where="evaluate.fidelity.clip")
    assert clip.image_embed_dim == QUICK.embed_dim and clip.image_size == QUICK.image_size
    # Fresh full-size pictures (64px, a seed neither the fit nor its report drew from), brought to
    # CLIP's 16px by its own preprocessing, as the dataset's images are when scored.
    full_size = demo_clip.DemoClipSettings(**{**vars(QUICK), "image_size": QUICK.source_size})
    images, embeddings = demo_clip.draw_pictures(48, seed=99, settings=full_size)
    own, others = _mean_cosines(clip, images, embeddings)
    # The dataset embeddings of two random pictures have a mean cosine near 0.45 (shared features:
    # same size, background or row); even this short fit (about 0.75 to its own, 0.43 to others')
    # must place a picture much nearer its own embedding. Unfitted, or fitted to shuffled targets,
    # the two are equal.
    assert own > others + 0.15, (own, others)
    # fit.json's ends of the scale are the loaded model's: the saved weights are the fitted ones.
    held_images, held_embeddings = demo_clip.draw_pictures(QUICK.held_out, QUICK.seed + 1, QUICK)
    loaded_own, loaded_others = _mean_cosines(clip, held_images, held_embeddings)
    written = json.loads((folder / demo_clip.REPORT_FILE).read_text())
    assert written == report
    # float32 cosines of unit vectors, averaged: the same computation up to the kernels' rounding.
    assert loaded_own == pytest.approx(report["held_out_cosine"]["own"], abs=1e-4)
    assert loaded_others == pytest.approx(report["held_out_cosine"]["others"], abs=1e-4)
    assert report["held_out_cosine"]["own"] > report["held_out_cosine"]["others"] + 0.15


def test_the_fit_draws_pictures_the_dataset_does_not():
    # The demo dataset draws from seed 0 by default; the CLIP fits on seed 1 and reports on seed 2.
    import inspect

    dataset_seed = inspect.signature(demo.generate_demo_dataset).parameters["seed"].default
    assert dataset_seed not in (QUICK.seed, QUICK.seed + 1)
    fitted_on, _ = demo_clip.draw_pictures(8, QUICK.seed, QUICK)
    dataset_like, _ = demo_clip.draw_pictures(8, dataset_seed, QUICK)
    assert not torch.equal(fitted_on, dataset_like)
    # The embeddings are the dataset's: the attributes' projection, the same function the dataset writes.
    attributes = demo.random_attributes(__import__("random").Random(dataset_seed), QUICK.shape_scale)
    _, first = demo_clip.draw_pictures(1, dataset_seed, QUICK)
    assert torch.equal(first[0], torch.from_numpy(demo.image_embedding(attributes, QUICK.embed_dim)))


def test_command_line_writes_a_loadable_folder_and_refuses_bad_sizes(tmp_path, capsys):
    out = tmp_path / "clip"
    assert demo_clip.main(["--out", str(out), "--num-images", "64", "--epochs", "1", "--embed-dim", "40"]) == 0
    printed = capsys.readouterr().out
    assert f'"model": "local-dir:{out}"' in printed and "cosine to their own embedding" in printed
    config = json.loads((out / demo_clip.CONFIG_FILE).read_text())
    assert config["model_cfg"]["embed_dim"] == 40 and config["model_cfg"]["vision_cfg"]["image_size"] == 16
    assert create_clip(ClipConfig(make="open_clip", model=f"local-dir:{out}")).image_embed_dim == 40
    with pytest.raises(SystemExit) as raised:
        demo_clip.main(["--out", str(tmp_path / "bad"), "--image-size", "18"])
    assert raised.value.code == 2 and "image_size must be a multiple of 4" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
