"""The rest of an exact epoch shared among another number of processes or workers (data.plan.RestOfEpoch):
what an interrupted run had not yet put in a batch is read once, nothing read twice or skipped."""

from __future__ import annotations

import collections
import itertools

import pytest

from dalle2_decoder import TrainDecoderConfig
from dalle2_decoder.data import create_dataloaders
from dalle2_decoder.data import plan as planning

from .training_fixtures import EMBED_DIM, tiny_config, write_tiny_demo


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_tiny_demo(tmp_path_factory.mktemp("demo"))


def loaders(demo_data, tmp_path, *, world_size, workers, batch_size=4):
    raw = tiny_config(demo_data, tmp_path / "run")
    raw["data"].update(num_workers=workers, batch_size=batch_size)
    config = TrainDecoderConfig.from_dict(raw)
    return [
        create_dataloaders(config.data, seed=config.seed, rank=rank, world_size=world_size, image_embed_dim=EMBED_DIM)[
            "train"
        ]
        for rank in range(world_size)
    ]


def keys_of(batches):
    return [key for batch in batches for key in batch["key"]]


def whole_epoch(demo_data, tmp_path):
    (loader,) = loaders(demo_data, tmp_path, world_size=1, workers=1)
    loader.set_epoch(0)
    return keys_of(loader)


@pytest.mark.parametrize(
    "old, new",
    [((2, 1), (3, 1)), ((2, 1), (1, 2)), ((1, 2), (2, 1)), ((3, 1), (2, 2))],
    ids=["2to3", "2to1-2workers", "1x2workers-to-2", "3to2x2workers"],
)
def test_the_rest_of_an_epoch_is_read_once_by_other_ranks_and_workers(demo_data, tmp_path, old, new):
    everything = whole_epoch(demo_data, tmp_path)
    assert len(everything) == len(set(everything)) == 48  # 3 train shards of 16

    old_world, old_workers = old
    before, frontiers = [], []
    for loader in loaders(demo_data, tmp_path, world_size=old_world, workers=old_workers):
        loader.set_epoch(0)
        iterator = iter(loader)
        trained = 2  # batches trained on when the run was interrupted; the loader may have read more
        before += keys_of(itertools.islice(iterator, trained))
        frontiers.append(loader.position(trained))
        iterator.close()
    assert len(before) == 2 * 4 * old_world

    new_world, new_workers = new
    after, lengths, sizes = [], set(), set()
    for loader in loaders(demo_data, tmp_path, world_size=new_world, workers=new_workers):
        rest = loader.leftover(0, world_size=old_world, workers=old_workers, frontiers=frontiers)
        assert rest.total == 48 - len(before)
        loader.set_epoch(0)
        loader.continue_epoch(0, rest)
        lengths.add(len(loader))
        sizes.add(tuple(loader.global_batch_samples()))
        batches = list(loader)
        assert len(batches) == len(loader)
        after += keys_of(batches)
        # saved and read back as a checkpoint holds it
        assert planning.RestOfEpoch.from_list(rest.to_list(), loader.dataset.shards) == rest
    assert len(lengths) == 1 and len(sizes) == 1  # every rank makes the same number of steps
    assert sum(sizes.pop()) == 48 - len(before)  # the steps count every sample left once
    seen = collections.Counter(before + after)
    assert [key for key, count in seen.items() if count > 1] == []  # nothing read twice
    assert sorted(seen) == sorted(everything)  # nothing skipped


def test_rest_of_epoch_split_is_contiguous_and_balanced():
    shard = planning.Shard(number=0, url="x", size=10)
    rest = planning.RestOfEpoch((planning.Piece(shard, 0, 10),))
    # 10 samples over 3 ranks: 4, 3, 3 samples; batch size 2 -> 2 batches each, the extra one in rank 0's last
    assert [rest.rank_range(rank, 3) for rank in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [rest.rank_batch_sizes(rank, 3, 2) for rank in range(3)] == [[2, 2], [2, 1], [2, 1]]
    plans = [rest.worker_plan(rank=rank, world_size=3, worker=0, workers=1, batch_size=2) for rank in range(3)]
    assert [[(p.start, p.stop) for p in plan.pieces] for plan in plans] == [[(0, 4)], [(4, 7)], [(7, 10)]]
