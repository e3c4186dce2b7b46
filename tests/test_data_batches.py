"""Batch memory: every batch is its own, in the main process and across the worker boundary, and
floats are exactly ToTensor's."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dalle2_decoder.config import DataConfig, DataSplits
from dalle2_decoder.data import create_dataloaders
from dalle2_decoder.data.loader import unit_float_batch

try:
    from .data_fixtures import jpeg_bytes, write_dataset
except ImportError:
    from data_fixtures import jpeg_bytes, write_dataset


def test_unit_float_batch_is_exactly_totensor():
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    converted = unit_float_batch(images)
    assert converted.dtype == torch.float32 and torch.equal(converted, images.float().div(255))
    pil = Image.fromarray(images[0].permute(1, 2, 0).numpy())
    assert torch.equal(converted[0], T.ToTensor()(pil))


def reference_images(keys):
    """ToTensor of each key's JPEG as data_fixtures writes it (shard width 6, index width 4)."""
    to_tensor = T.ToTensor()
    images = []
    for key in keys:
        shard, index = int(key[:6]), int(key[6:])
        with Image.open(io.BytesIO(jpeg_bytes(shard * 31 + index))) as image:
            images.append(to_tensor(image.convert("RGB")))
    return torch.stack(images)


@pytest.mark.parametrize("uint8_images", [False, True])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_every_batch_of_an_epoch_held_at_once_keeps_its_images(tmp_path, num_workers, uint8_images):
    """Batches are kept (as a training loop may) while later ones are made: none may change, and
    none shares memory with another."""
    dataset = write_dataset(str(tmp_path), [12, 12, 12])
    config = DataConfig(
        webdataset_base_url=dataset.base_url,
        img_embeddings_url=dataset.img_embeddings_url,
        num_workers=num_workers,
        batch_size=2,
        shuffle_train=False,
        splits=DataSplits(train=1.0, val=0.0, test=0.0),
    )
    loader = create_dataloaders(config, seed=0, uint8_images=uint8_images)["train"]
    batches = list(loader)
    assert len(batches) == 18
    assert len({batch["image"].untyped_storage().data_ptr() for batch in batches}) == 18
    for batch in batches:
        assert batch["image"].dtype == (torch.uint8 if uint8_images else torch.float32)
        images = batch["image"].float() / 255 if uint8_images else batch["image"]
        torch.testing.assert_close(images, reference_images(batch["key"]), rtol=0, atol=1e-6 if uint8_images else 0)
