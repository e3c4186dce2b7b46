"""Preprocessing specs, the demo dataset generator and the prepare command."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dalle2_decoder.config import DataSplits
from dalle2_decoder.data import (
    PreprocessingError,
    build_transform,
    create_dataloaders,
    demo,
    prepare,
    validate_preprocessing,
)

try:
    from .data_fixtures import keys_of
except ImportError:
    from data_fixtures import keys_of


# ----- preprocessing -----------------------------------------------------------------------------


def test_transforms_by_name_with_arguments():
    transform = build_transform(
        {
            "RandomResizedCrop": {"size": 16, "scale": [0.5, 1.0]},
            "RandomHorizontalFlip": True,
            "ColorJitter": {"brightness": 0.1},
            "ToTensor": True,
        }
    )
    image = transform(Image.new("RGB", (40, 30), (255, 128, 0)))
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    resized = build_transform({"Resize": 12, "CenterCrop": [10]})(Image.new("RGB", (30, 20)))
    assert resized.shape == (3, 10, 10)  # ToTensor is added when the spec has none


def test_unknown_transform_names_the_closest_valid_one():
    problems = validate_preprocessing({"RandomResizeCrop": {"size": 8}, "Resize": {"sise": 3}, "ToTensor": True})
    assert problems[0] == "RandomResizeCrop: unknown transform 'RandomResizeCrop'; did you mean 'RandomResizedCrop'?"
    assert problems[1].startswith("Resize: bad arguments") and "sise" in problems[1]
    with pytest.raises(PreprocessingError) as raised:
        build_transform({"totensor": True, "CentreCrop": 8})
    assert isinstance(raised.value, ValueError)
    assert [name for name, _ in raised.value.problems] == ["totensor", "CentreCrop"]
    assert "did you mean 'ToTensor'" in str(raised.value) and "did you mean 'CenterCrop'" in str(raised.value)
    assert validate_preprocessing({"ToTensor": True, "Normalize": False}) == []


# ----- demo dataset ------------------------------------------------------------------------------


def test_demo_dataset_is_learnable_and_loads(tmp_path):
    data = demo.generate_demo_dataset(str(tmp_path), num_images=60, image_size=32, embed_dim=40, shard_size=20)
    assert sorted(os.listdir(tmp_path / "shards")) == ["000000.tar", "000001.tar", "000002.tar", "sizes.json"]
    from dalle2_decoder.config import DataConfig

    config = DataConfig(**data, num_workers=0, batch_size=16, splits=DataSplits(train=1.0, val=0.0, test=0.0))
    loaders = create_dataloaders(config, seed=0)
    batches = list(loaders["train"])
    assert len(keys_of(batches)) == 60
    batch = batches[0]
    assert batch["image"].shape == (16, 3, 32, 32)
    assert batch["image_embed"].shape == (16, 40) and batch["text_embed"].shape == (16, 40)
    assert torch.allclose(batch["image_embed"].norm(dim=1), torch.ones(16), atol=1e-5)
    assert all(caption.startswith("a ") and "background" in caption for caption in batch["caption"])
    # The embedding determines the picture: attributes -> embedding is one-to-one and fixed.
    projection = demo._projection(40, 0)
    first = demo._embed(demo._features("circle", "red", "small", 0.3, 0.6, "black", True), projection)
    again = demo._embed(demo._features("circle", "red", "small", 0.3, 0.6, "black", True), demo._projection(40, 0))
    other = demo._embed(demo._features("square", "red", "small", 0.3, 0.6, "black", True), projection)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 0.05
    # Same caption, same text embedding; different pictures, different image embeddings.
    by_caption = {}
    for caption, text_embed, _image_embed in zip(batch["caption"], batch["text_embed"], batch["image_embed"]):
        if caption in by_caption:
            assert torch.equal(by_caption[caption], text_embed)
        by_caption[caption] = text_embed
    assert len({tuple(row.tolist()) for row in batch["image_embed"]}) == 16


def test_demo_command_line(tmp_path, capsys):
    assert (
        demo.main(
            [
                "--out",
                str(tmp_path),
                "--num-images",
                "10",
                "--image-size",
                "16",
                "--embed-dim",
                "32",
                "--embeddings-in-shards",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "data_config.json").read_text())
    assert "img_embeddings_url" not in printed["data"]
    with pytest.raises(ValueError, match="embed_dim must be at least"):
        demo.generate_demo_dataset(str(tmp_path / "x"), num_images=1, embed_dim=4)


def test_shape_scale_enlarges_the_shapes_and_keeps_them_inside(tmp_path):
    # A large square drawn at scale s covers (2 * 0.22 * s * side)^2 pixels: the area grows as s^2,
    # up to the anti-aliased edge (one pixel wide all round at most, so a bound of 4 * width + 4).
    side = 64

    def covered(scale):
        picture = demo.draw_shape("square", "red", "large", 0.5, 0.5, "black", side, scale)
        return int((np.asarray(picture).max(axis=2) > 127).sum())

    for scale in (1.0, 1.5, 2.0):
        width = 2 * 0.22 * scale * side
        assert abs(covered(scale) - width**2) <= 4 * width + 4, scale
    # Every shape of a scaled dataset lies wholly inside the image: the border rows and columns
    # stay background (black or white) in every picture of a large-shape dataset at the largest scale.
    demo.generate_demo_dataset(str(tmp_path), num_images=40, image_size=32, shard_size=40, shape_scale=2.0)
    import tarfile

    with tarfile.open(tmp_path / "shards" / "000000.tar") as archive:
        pictures = [
            np.asarray(Image.open(archive.extractfile(member)).convert("RGB")).astype(int)
            for member in archive.getmembers()
            if member.name.endswith(".jpg")
        ]
    assert len(pictures) == 40
    for picture in pictures:
        border = np.concatenate([picture[0], picture[-1], picture[:, 0], picture[:, -1]])
        background = border[0]
        assert (np.abs(border - background).max(axis=1) < 60).all()  # JPEG noise only
    for bad in (0.0, -1.0, 2.5):
        with pytest.raises(ValueError, match="shape_scale must be in"):
            demo.generate_demo_dataset(str(tmp_path / "bad"), num_images=1, shape_scale=bad)


# ----- prepare -----------------------------------------------------------------------------------


class FakeClipEmbedder:
    """Test double for the CLIP adapter: deterministic embeddings of the pixels and of the text."""

    image_size = 16

    def __init__(self, dim=6):
        self.dim = dim
        self.seen_shapes = []

    def embed_images(self, images):
        self.seen_shapes.append(tuple(images.shape))
        means = images.mean(dim=(2, 3))  # (B, 3)
        return torch.cat([means, means**2], dim=1)[:, : self.dim] + 0.01

    def embed_texts(self, captions):
        return torch.tensor([[len(c), sum(map(ord, c)) % 97, 1, 2, 3, 4] for c in captions], dtype=torch.float32)


def test_prepare_folder_into_shards_and_embeddings(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    colours = {}
    for i in range(7):
        colour = (30 * i, 255 - 30 * i, 100)
        path = images / ("sub" if i % 2 else "") / f"img{i}.{'png' if i == 3 else 'jpg'}"
        Image.new("RGB", (20 + i, 24), colour).save(path)
        colours[path.stem] = colour
        if i != 5:
            path.with_suffix(".txt").write_text(f"picture number {i}")
    (images / "broken.jpg").write_bytes(b"not an image")
    embedder = FakeClipEmbedder()
    data = prepare.prepare_dataset(str(images), str(tmp_path / "out"), embedder, shard_size=3, batch_size=4)
    assert all(shape[1:] == (3, 16, 16) for shape in embedder.seen_shapes)
    sizes = json.loads((tmp_path / "out" / "shards" / "sizes.json").read_text())
    assert {name: entry["samples"] for name, entry in sizes.items()} == {
        "000000.tar": 3,
        "000001.tar": 3,
        "000002.tar": 1,
    }
    assert all(entry["bytes"] == os.path.getsize(tmp_path / "out" / "shards" / name) for name, entry in sizes.items())
    from dalle2_decoder.config import DataConfig

    config = DataConfig(
        **data,
        batch_size=7,
        num_workers=0,
        splits=DataSplits(train=1.0, val=0.0, test=0.0),
        shuffle_train=False,
        max_bad_sample_fraction=0.5,
        preprocessing={"Resize": 8, "CenterCrop": 8, "ToTensor": True},
    )
    loader = create_dataloaders(config, seed=0)["train"]
    (batch,) = list(loader)
    assert loader.stats["ok"] == 6 and loader.stats["missing_embedding"] == 1  # img5 has no caption
    order = [p for p, _ in prepare.find_images(str(images)) if "broken" not in p]
    expected = {f"{j // 3:06d}{j % 3:04d}": path for j, path in enumerate(order)}  # written in this order
    assert set(batch["key"]) == set(expected) - {key for key, path in expected.items() if "img5" in path}
    for key, caption, image_embed, text_embed in zip(
        batch["key"], batch["caption"], batch["image_embed"], batch["text_embed"]
    ):
        stem = os.path.splitext(os.path.basename(expected[key]))[0]
        assert caption == f"picture number {stem[3:]}"
        pixels = torch.tensor(colours[stem], dtype=torch.float32) / 255
        torch.testing.assert_close(image_embed[:3], pixels + 0.01, atol=0.02, rtol=0)
        torch.testing.assert_close(text_embed, embedder.embed_texts([caption])[0])


def test_batch_images_equal_torchvision_preprocessing(tmp_path):
    from torchvision import transforms as T

    from dalle2_decoder.config import DataConfig

    try:
        from .data_fixtures import jpeg_bytes, write_dataset
    except ImportError:
        from data_fixtures import jpeg_bytes, write_dataset
    dataset = write_dataset(str(tmp_path), [3, 3], overrides={"0000010001": {"jpg": jpeg_bytes(9, size=12)}})
    spec = {"Resize": 8, "CenterCrop": 6, "ToTensor": True, "Normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    reference = T.Compose([T.Resize(8), T.CenterCrop(6), T.ToTensor(), T.Normalize([0.5] * 3, [0.25] * 3)])
    for workers in (0, 1):
        config = DataConfig(
            webdataset_base_url=dataset.base_url,
            img_embeddings_url=dataset.img_embeddings_url,
            num_workers=workers,
            batch_size=6,
            preprocessing=spec,
            shuffle_train=False,
            splits=DataSplits(train=1.0, val=0.0, test=0.0),
        )
        (batch,) = list(create_dataloaders(config, seed=0)["train"])
        for key, image in zip(batch["key"], batch["image"]):
            number, index = int(key[:6]), int(key[6:])
            jpeg = jpeg_bytes(9, size=12) if key == "0000010001" else jpeg_bytes(number * 31 + index)
            expected = reference(Image.open(io.BytesIO(jpeg)))
            torch.testing.assert_close(image, expected, rtol=0, atol=1e-6)


def test_uint8_batches_hold_the_same_pixels_as_float_batches(tmp_path):
    from dalle2_decoder.config import DataConfig

    try:
        from .data_fixtures import write_dataset
    except ImportError:
        from data_fixtures import write_dataset
    dataset = write_dataset(str(tmp_path), [3, 3])
    batches = {}
    for workers in (0, 1):
        config = DataConfig(
            webdataset_base_url=dataset.base_url,
            img_embeddings_url=dataset.img_embeddings_url,
            num_workers=workers,
            batch_size=6,
            shuffle_train=False,
            preprocessing={"Resize": 8, "ToTensor": True},
            splits=DataSplits(train=1.0, val=0.0, test=0.0),
        )
        for uint8 in (False, True):
            (batch,) = list(create_dataloaders(config, seed=0, uint8_images=uint8)["train"])
            batches[workers, uint8] = batch["image"]
    for workers in (0, 1):
        assert batches[workers, True].dtype == torch.uint8 and batches[workers, False].dtype == torch.float32
        torch.testing.assert_close(batches[workers, True].float() / 255, batches[workers, False], rtol=0, atol=1e-6)
    # Tensor transforms need floats: with them the batch stays float whatever was asked.
    config = DataConfig(
        webdataset_base_url=dataset.base_url,
        img_embeddings_url=dataset.img_embeddings_url,
        num_workers=0,
        batch_size=6,
        shuffle_train=False,
        splits=DataSplits(train=1.0, val=0.0, test=0.0),
        preprocessing={"ToTensor": True, "Normalize": {"mean": [0.5] * 3, "std": [0.5] * 3}},
    )
    (batch,) = list(create_dataloaders(config, seed=0, uint8_images=True)["train"])
    assert batch["image"].dtype == torch.float32 and batch["image"].min() < 0
