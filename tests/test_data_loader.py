"""create_dataloaders on local shards: exact epochs, embeddings, splits, ranks and workers, capped epochs."""

import collections
import math

import numpy as np
import pytest
import torch

from dalle2_decoder.config import DataSplits
from dalle2_decoder.data import DataSetupError, create_dataloaders

try:
    from .data_fixtures import data_config, keys_of, write_dataset
except ImportError:
    from data_fixtures import data_config, keys_of, write_dataset

SIZES = [7, 5, 9, 3, 6]  # uneven shards: 30 samples


def check_batches(batches, dataset, *, text=False):
    for batch in batches:
        n = len(batch["key"])
        assert batch["image"].shape == (n, 3, 8, 8) and batch["image"].dtype == torch.float32
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert batch["image_embed"].dtype == torch.float32
        assert batch["caption"] == [dataset.captions[key] for key in batch["key"]]
        for key, row in zip(batch["key"], batch["image_embed"]):
            np.testing.assert_array_equal(row.numpy(), dataset.image_embeds[key])
        if text:
            for key, row in zip(batch["key"], batch["text_embed"]):
                np.testing.assert_array_equal(row.numpy(), dataset.text_embeds[key])
        else:
            assert "text_embed" not in batch


@pytest.mark.parametrize("shard_width,index_width", [(6, 4), (3, 2), (5, 6)])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_every_sample_once_with_its_embedding_row(tmp_path, shard_width, index_width, num_workers):
    dataset = write_dataset(
        str(tmp_path), SIZES, shard_width=shard_width, index_width=index_width, text=True, start_shard=3
    )
    config = data_config(
        dataset,
        shard_width=shard_width,
        index_width=index_width,
        num_workers=num_workers,
        shuffle_train=num_workers == 2,
        shuffle_buffer=10,
    )
    loader = create_dataloaders(config, seed=0)["train"]
    batches = list(loader)
    keys = keys_of(batches)
    assert sorted(keys) == sorted(dataset.keys) and len(keys) == 30
    assert len(batches) == len(loader) == math.ceil(30 / 4)
    check_batches(batches, dataset, text=True)
    assert loader.stats["seen"] == loader.stats["ok"] == 30 and loader.stats["padded"] == 0


def test_two_ranks_two_workers_read_each_sample_once_with_equal_batch_counts(tmp_path):
    dataset = write_dataset(str(tmp_path), [7, 5, 9, 4, 6])  # 31 samples: one is left over for 2 ranks
    config = data_config(dataset, num_workers=2, batch_size=3, shuffle_train=True, shuffle_buffer=5)
    seen = collections.Counter()
    lengths, dropped = [], 0
    for rank in range(2):
        loader = create_dataloaders(config, seed=7, rank=rank, world_size=2)["train"]
        loader.set_epoch(3)
        batches = list(loader)
        assert len(batches) == len(loader)
        lengths.append(len(batches))
        seen.update(keys_of(batches))
        check_batches(batches, dataset)
        assert loader.stats["ok"] == 15
        dropped += loader.stats["dropped_for_balance"]
    assert lengths[0] == lengths[1] == math.ceil(15 / 3)
    assert max(seen.values()) == 1
    assert len(seen) == 30 and dropped == 1 and len(set(dataset.keys) - set(seen)) == 1


def test_fewer_shards_than_ranks_times_workers_still_exact(tmp_path):
    dataset = write_dataset(str(tmp_path), [10])
    config = data_config(dataset, num_workers=2, batch_size=2)
    keys = []
    for rank in range(3):
        loader = create_dataloaders(config, seed=0, rank=rank, world_size=3)["train"]
        batches = list(loader)
        assert len(batches) == len(loader) == 2  # 3 samples per rank: a batch of 2 and one of 1
        keys += keys_of(batches)
    assert len(keys) == len(set(keys)) == 9


def test_epochs_reshuffle_but_keep_the_sample_set(tmp_path):
    dataset = write_dataset(str(tmp_path), [8, 8, 8, 8])
    loader = create_dataloaders(data_config(dataset, shuffle_train=True, shuffle_buffer=8), seed=1)["train"]
    orders = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        orders.append(keys_of(loader))
    assert orders[0] == orders[2] != orders[1]
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(dataset.keys)
    unshuffled = create_dataloaders(data_config(dataset), seed=1)["train"]
    assert keys_of(unshuffled) == dataset.keys


def test_splits_are_disjoint_deterministic_and_follow_the_seed(tmp_path):
    dataset = write_dataset(str(tmp_path), [2] * 20)
    config = data_config(dataset, splits=DataSplits(train=0.75, val=0.15, test=0.1))

    def shards_by_phase(seed):
        loaders = create_dataloaders(config, seed=seed)
        return {phase: {key[:6] for key in keys_of(loader)} for phase, loader in loaders.items()}

    first = shards_by_phase(0)
    assert [len(first[p]) for p in ("train", "val", "test")] == [15, 3, 2]
    assert (
        not (first["train"] & first["val"])
        and not (first["train"] & first["test"])
        and not (first["val"] & first["test"])
    )
    assert shards_by_phase(0) == first
    assert shards_by_phase(1) != first


def test_embeddings_inside_shards(tmp_path):
    dataset = write_dataset(str(tmp_path), [4, 6], embeddings="shard", text=True, dim=5)
    loader = create_dataloaders(data_config(dataset, num_workers=1), seed=0)["train"]
    batches = list(loader)
    assert sorted(keys_of(batches)) == sorted(dataset.keys)
    check_batches(batches, dataset, text=True)
    assert batches[0]["image_embed"].shape[1] == 5


def test_shards_without_embeddings_give_images_and_captions(tmp_path):
    dataset = write_dataset(str(tmp_path), [4], embeddings="none")
    batch = next(iter(create_dataloaders(data_config(dataset), seed=0)["train"]))
    assert set(batch) == {"image", "caption", "key"}


def test_shard_range_and_listing(tmp_path):
    dataset = write_dataset(str(tmp_path), [3, 3, 3, 3], start_shard=10)
    loader = create_dataloaders(data_config(dataset, start_shard=11, end_shard=12), seed=0)["train"]
    assert {key[:6] for key in keys_of(loader)} == {"000011", "000012"}
    with pytest.raises(DataSetupError, match="no shard"):
        create_dataloaders(data_config(dataset, start_shard=20, end_shard=30), seed=0)


def test_capped_epoch_yields_exact_full_batches_on_every_rank(tmp_path):
    dataset = write_dataset(str(tmp_path), [5, 5, 5, 5])
    config = data_config(dataset, num_workers=2, batch_size=3, shuffle_train=True, shuffle_buffer=4)
    for rank in range(2):
        loader = create_dataloaders(config, seed=0, rank=rank, world_size=2, epoch_samples=50)["train"]
        batches = list(loader)
        assert len(batches) == len(loader) == 50 // (2 * 3)
        assert all(len(batch["key"]) == 3 for batch in batches)
        check_batches(batches, dataset)
    with pytest.raises(DataSetupError, match="resample_train needs"):
        create_dataloaders(data_config(dataset, resample_train=True), seed=0)


def test_capped_epoch_with_too_few_shards_is_an_error_unless_resampling(tmp_path):
    dataset = write_dataset(str(tmp_path), [6, 6])
    config = data_config(dataset, num_workers=2, batch_size=2)
    with pytest.raises(DataSetupError, match="2 shard\\(s\\) for 2 rank\\(s\\) x 2 worker\\(s\\)"):
        len(create_dataloaders(config, seed=0, world_size=2, epoch_samples=16)["train"])
    resampled = data_config(dataset, num_workers=2, batch_size=2, resample_train=True)
    for rank in range(2):
        loader = create_dataloaders(resampled, seed=0, rank=rank, world_size=2, epoch_samples=16)["train"]
        batches = list(loader)
        assert len(batches) == len(loader) == 4
        check_batches(batches, dataset)


def test_validation_samples_caps_the_val_phase(tmp_path):
    dataset = write_dataset(str(tmp_path), [6] * 10)
    config = data_config(dataset, splits=DataSplits(train=0.5, val=0.5, test=0.0), batch_size=2)
    loaders = create_dataloaders(config, seed=0, validation_samples=8)
    assert len(list(loaders["val"])) == len(loaders["val"]) == 4
    assert len(loaders["test"]) == 0 and list(loaders["test"]) == []


def test_worker_random_augmentations_repeat_for_the_same_epoch_whatever_the_global_rng(tmp_path):
    import torch

    from dalle2_decoder.config import DataConfig

    try:
        from .data_fixtures import write_dataset
    except ImportError:
        from data_fixtures import write_dataset
    import io

    from PIL import Image

    gradient = Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8)[None, :, None], (32, 1, 3)))
    buffer = io.BytesIO()
    gradient.save(buffer, format="PNG")  # lossless: crops of a gradient differ visibly
    keys = [f"{shard:06d}{index:04d}" for shard in range(2) for index in range(4)]
    dataset = write_dataset(str(tmp_path), [4, 4], overrides={key: {"jpg": buffer.getvalue()} for key in keys})
    config = DataConfig(
        webdataset_base_url=dataset.base_url,
        img_embeddings_url=dataset.img_embeddings_url,
        num_workers=1,
        batch_size=8,
        shuffle_train=False,
        splits=DataSplits(train=1.0, val=0.0, test=0.0),
        preprocessing={"RandomResizedCrop": {"size": 6}, "ToTensor": True},
    )
    loader = create_dataloaders(config, seed=0)["train"]
    images = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # a resumed process has another global RNG state
        loader.set_epoch(3)
        images.append(next(iter(loader))["image"])
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)
    loader.set_epoch(4)
    assert not torch.equal(next(iter(loader))["image"], images[0])  # another epoch, other crops
