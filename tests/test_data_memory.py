"""Recycled batch memory: reuse is what makes the loader fast, and it must never overwrite a
batch that anyone still holds, in the main process or across the worker boundary."""

from __future__ import annotations

import gc
import io
import threading

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

BIG = (8, 3, 256, 256)  # 6 MiB of floats: large enough to come from the recycled huge-page pool


def test_a_recycled_batch_is_handed_out_again_only_after_every_view_is_gone():
    pool = memory.RecycledMemory(keep=2)
    first = pool.tensor(3 * memory.HUGE_PAGE)
    assert first.data_ptr() % memory.HUGE_PAGE == 0
    first.fill_(1)
    view = first[10:20]
    del first
    gc.collect()
    second = pool.tensor(3 * memory.HUGE_PAGE)  # the first one is still in use through `view`
    second.fill_(2)
    assert pool.created == 2 and bool((view == 1).all())
    address = view.data_ptr() - 10
    del view
    gc.collect()
    third = pool.tensor(3 * memory.HUGE_PAGE)
    assert pool.created == 2 and third.data_ptr() == address  # recycled, not mapped again
    del second, third
    gc.collect()
    for _ in range(5):  # a smaller request fits a free mapping
        assert pool.tensor(memory.HUGE_PAGE).numel() == memory.HUGE_PAGE
    assert pool.created == 2


def test_memory_moved_to_shared_memory_or_numpy_keeps_its_batch():
    pool = memory.RecycledMemory()
    batch = pool.tensor(memory.HUGE_PAGE)
    batch.fill_(7)
    as_numpy = batch.numpy()  # holds the tensor, so the memory stays taken
    del batch
    gc.collect()
    pool.tensor(memory.HUGE_PAGE).fill_(9)
    assert (as_numpy == 7).all()
    shared = torch.from_numpy(as_numpy).share_memory_()  # copies out; the mapping is free once the array goes
    del as_numpy
    gc.collect()
    reused = pool.tensor(memory.HUGE_PAGE)
    reused.fill_(3)
    assert bool((shared == 7).all()) and pool.created == 2


def test_batches_freed_on_other_threads_return_safely():
    pool = memory.RecycledMemory(keep=4)
    held = [pool.tensor(memory.HUGE_PAGE) for _ in range(8)]

    def free(tensors):
        tensors.clear()
        gc.collect()

    threads = [threading.Thread(target=free, args=(held[i::2],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held.clear()
    gc.collect()
    assert len(pool._free) == 4  # kept up to `keep`, the rest unmapped


def test_free_mappings_of_sizes_no_longer_asked_for_age_out():
    pool = memory.RecycledMemory(keep=2)
    small = [pool.tensor(memory.HUGE_PAGE) for _ in range(2)]
    del small
    gc.collect()
    for _ in range(3):  # larger batches now: each needs its own mapping at first, then recycles
        big = [pool.tensor(4 * memory.HUGE_PAGE) for _ in range(2)]
        del big
        gc.collect()
    assert pool.created == 4
    assert all(len(mapping) >= 4 * memory.HUGE_PAGE for mapping in pool._free)


def test_empty_batch_falls_back_for_small_and_pinned_requests():
    small = memory.empty_batch((2, 3, 8, 8), torch.float32)
    assert small.shape == (2, 3, 8, 8) and small.is_contiguous()
    big = memory.empty_batch(BIG, torch.float32)
    assert big.shape == BIG and big.is_contiguous() and big.data_ptr() % memory.HUGE_PAGE == 0


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
    monkeypatch.setattr(memory, "HUGE_PAGE", 256)  # these tiny batches take the recycled path too
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
