"""Capped epochs (train.epoch_samples) split the shards exactly among 2 ranks x 2 workers."""

import collections

import pytest

from dalle2_decoder.data import create_dataloaders

from .data_fixtures import data_config, keys_of, write_dataset


def shard_of(key: str) -> int:
    return int(key[:-4])  # keys are <shard number><4-digit index>


@pytest.mark.slow
@pytest.mark.parametrize("epoch", [0, 1])
@pytest.mark.parametrize("shuffle", [False, True])
def test_capped_epoch_splits_shards_among_two_ranks_of_two_workers(tmp_path, epoch, shuffle):
    # 8 shards of 4: each of the 4 readers gets 2 shards (8 samples), exactly its quota of 4 batches of 2
    dataset = write_dataset(str(tmp_path), [4] * 8)
    config = data_config(dataset, num_workers=2, batch_size=2, shuffle_train=shuffle, shuffle_buffer=4)
    per_rank = []
    for rank in range(2):
        loader = create_dataloaders(config, seed=5, rank=rank, world_size=2, epoch_samples=32)["train"]
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == 8 and all(len(batch["key"]) == 2 for batch in batches)
        per_rank.append(keys_of(batches))
    shards = [{shard_of(key) for key in keys} for keys in per_rank]
    assert not shards[0] & shards[1], "both ranks read the same shards"
    assert shards[0] | shards[1] == set(range(8)) and len(shards[0]) == len(shards[1]) == 4
    if not shuffle:  # without a shuffle buffer holding samples back at the quota, exactly every sample once
        counts = collections.Counter(per_rank[0] + per_rank[1])
        assert len(counts) == 32 and set(counts.values()) == {1}
