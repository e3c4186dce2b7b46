"""The data preparation command embeds a folder of images with the real CLIP adapter (tiny local model)."""

import json

import numpy as np
import torch
from PIL import Image

from dalle2_decoder.clip import create_clip
from dalle2_decoder.config import ClipConfig, DataConfig, DataSplits
from dalle2_decoder.data import create_dataloaders, prepare

from .clip_fixtures import TINY_EMBED_DIM, write_tiny_open_clip
from .numerics import NETWORK, assert_close_to_scale


def test_prepare_command_writes_clip_embeddings_that_load(tmp_path, capsys):
    model = write_tiny_open_clip(tmp_path / "clip")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.new("RGB", (40, 36), (40 * i, 200 - 30 * i, 90)).save(images / f"img{i}.jpg")
        (images / f"img{i}.txt").write_text(f"a flat picture, colour {i}")
    out = tmp_path / "out"
    status = prepare.main(
        [
            "--images",
            str(images),
            "--out",
            str(out),
            "--clip-make",
            "open_clip",
            "--clip-model",
            model,
            "--shard-size",
            "3",
            "--batch-size",
            "2",
        ]
    )
    assert status == 0
    data = json.loads(capsys.readouterr().out)["data"]
    img_files = sorted((out / "img_emb").iterdir())
    assert [f.name for f in img_files][0].endswith("_000000.npy") and len(img_files) == 2
    rows = np.concatenate([np.load(f) for f in img_files])
    assert rows.shape == (5, TINY_EMBED_DIM)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)

    # The rows are CLIP's embeddings of those very images, and the loader hands them out with them.
    clip = create_clip(ClipConfig(make="open_clip", model=model))
    config = DataConfig(
        **data,
        batch_size=5,
        num_workers=0,
        splits=DataSplits(train=1.0, val=0.0, test=0.0),
        shuffle_train=False,
        preprocessing={"ToTensor": True},
    )
    (batch,) = list(create_dataloaders(config, seed=0)["train"])
    assert batch["text_embed"].shape == (5, TINY_EMBED_DIM)
    for key, embed in zip(batch["key"], batch["image_embed"]):
        index = int(key[-4:]) + 3 * int(key[:-4])
        picture = torch.from_numpy(np.array(Image.open(images / f"img{index}.jpg").convert("RGB"))).permute(2, 0, 1)
        expected = clip.embed_images(picture[None].float() / 255)[0]
        # the same network on the same pixels, in a batch of 5 there and of 1 here
        assert_close_to_scale(embed, expected, ulps_of_scale=NETWORK, what=key)


def test_prepare_command_names_missing_clip_weights(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"")
    status = prepare.main(
        ["--images", str(tmp_path), "--out", str(tmp_path / "out"), "--clip-weights", str(tmp_path / "ViT-L-14.pt")]
    )
    assert status == 2
    assert "ViT-L-14.pt" in capsys.readouterr().err


def test_prepare_command_names_an_out_folder_it_cannot_create(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / "shards"
    status = prepare.main(["--images", str(tmp_path), "--out", str(out), "--clip-weights", str(tmp_path / "w.pt")])
    assert status == 2
    err = capsys.readouterr().err
    assert f"--out: {tmp_path / 'a-file'} is a file, so {out} cannot be created" in err
    assert not out.exists()
