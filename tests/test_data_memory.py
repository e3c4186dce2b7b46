"""Pooled worker buffers: reuse saves the workers' page faults, and it must never overwrite a
batch that anyone still holds, in the main process or across the worker boundary."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dalle2_decoder.config import DataConfig, DataSplits
from dalle2_decoder.data import create_dataloaders, memory
from dalle2_decoder.data import dataset as dataset_module

try:
    from .data_fixtures import jpeg_bytes, write_dataset
except ImportError:
    from data_fixtures import jpeg_bytes, write_dataset

BIG = (8, 3, 256, 256)


def test_unit_float_batch_is_exactly_totensor():
    images = torch.randint(0, 256, BIG, dtype=torch.uint8)
    expected = images.float().div(255)
    assert torch.equal(memory.unit_float_batch(images), expected)


def test_worker_pool_reuses_a_buffer_only_after_the_main_process_hands_it_back():
    pool = memory.SharedBatchPool(slots=2)
    first, ticket1 = pool.acquire((4, 3, 8, 8), torch.uint8)
    second, ticket2 = pool.acquire((4, 3, 8, 8), torch.uint8)
    first.fill_(1)
    second.fill_(2)
    extra, ticket3 = pool.acquire((4, 3, 8, 8), torch.uint8)  # both in flight: a one-off buffer
    assert ticket3 is None and extra.is_shared()
    extra.fill_(3)
    assert bool((first == 1).all()) and bool((second == 2).all())
    releaser = memory.BatchReleaser()
    releaser.release(0, ticket2, second)
    again, ticket4 = pool.acquire((2, 3, 8, 8), torch.uint8)  # a smaller last batch fits
    assert ticket4[1] == ticket2[1] and again.data_ptr() == second.data_ptr()
    assert bool((first == 1).all())


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
def test_every_batch_of_an_epoch_held_at_once_keeps_its_images(tmp_path, monkeypatch, num_workers, uint8_images):
    """Batches are kept (as a training loop may) while the pools recycle: none may change."""
    dataset = write_dataset(str(tmp_path), [12, 12, 12])
    tickets = []
    original = memory.BatchReleaser.release

    def recording(self, worker, ticket, received):
        tickets.append((worker, None if ticket is None else ticket[1]))
        original(self, worker, ticket, received)

    monkeypatch.setattr(memory.BatchReleaser, "release", recording)
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
    assert len(batches) == 18 > dataset_module.POOLED_BATCHES * max(1, num_workers)
    for batch in batches:
        images = batch["image"].float() / 255 if uint8_images else batch["image"]
        assert batch["image"].dtype == (torch.uint8 if uint8_images else torch.float32)
        torch.testing.assert_close(images, reference_images(batch["key"]), rtol=0, atol=1e-6 if uint8_images else 0)
    if num_workers:
        # Worker buffers were handed back and reused: at most POOLED_BATCHES per worker.
        assert len(tickets) == 18 and all(index is not None for _, index in tickets)
        for worker in range(num_workers):
            used = {index for w, index in tickets if w == worker}
            assert len(used) <= dataset_module.POOLED_BATCHES
