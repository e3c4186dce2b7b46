"""Properties of the data plan and of the evaluation's per-rank shares, for any counts.

The expected values are computed here from the rules docs/DATA.md and docs/EVALUATION.md state
(integer arithmetic on the counts), never by calling the planner to find out. Each property runs
over counts that do not divide evenly among ranks, workers and batches, where one-off bugs live.
"""

from __future__ import annotations

import math
import threading
from typing import Dict, List, Tuple

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dalle2_decoder.data import plan
from dalle2_decoder.data.dataset import PhaseSettings, ShardDataset
from dalle2_decoder.evaluation.evaluate import evaluate_decoder
from dalle2_decoder.evaluation.metrics import samples_per_rank

shard_sizes = st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=10)
ranks = st.integers(min_value=1, max_value=5)
workers = st.integers(min_value=1, max_value=4)
batch_sizes = st.integers(min_value=1, max_value=9)


def make_shards(sizes: List[int]) -> List[plan.Shard]:
    return [plan.Shard(number, f"/data/{number:06d}.tar", size=size) for number, size in enumerate(sizes)]


def samples_of(order: List[plan.Shard], piece: plan.Piece) -> List[int]:
    """The global ordinals (position in the epoch's shard sequence) of the samples a piece covers."""
    offset = 0
    for shard in order:
        if shard is piece.shard:
            stop = shard.size if piece.stop is None else piece.stop
            return [offset + ordinal for ordinal in range(piece.start, stop)]
        offset += shard.size
    raise AssertionError(f"piece of a shard not in the order: {piece.shard}")


# --- exact epochs -------------------------------------------------------------------------------


@given(sizes=shard_sizes, world_size=ranks, num_workers=workers, batch_size=batch_sizes)
def test_exact_epoch_reads_every_sample_once_in_equal_rank_shares(sizes, world_size, num_workers, batch_size):
    """Exact epochs (docs/DATA.md): the epoch's samples are cut into `world_size` equal contiguous
    ranges of total // world_size samples (the total % world_size left over are dropped, fewer than
    one per rank); every kept sample is read exactly once, by one worker of one rank; each rank's
    range is cut into batch-aligned ranges, one per worker, contiguous and in worker order, the
    workers' batch counts differing by at most one; every rank yields ceil(share / batch_size)
    batches, all full but the one holding the rank's last samples."""
    order = make_shards(sizes)
    total = sum(sizes)
    share = total // world_size
    assert 0 <= total - share * world_size < world_size
    read: List[int] = []
    for rank in range(world_size):
        rank_samples: List[int] = []
        batch_counts = []
        batches: List[int] = []
        for worker in range(num_workers):
            worker_plan = plan.exact_worker_plan(
                order, rank=rank, world_size=world_size, worker=worker, workers=num_workers, batch_size=batch_size
            )
            samples = [ordinal for piece in worker_plan.pieces for ordinal in samples_of(order, piece)]
            assert len(samples) == sum(worker_plan.batch_sizes), "the pieces hold what the batches need"
            if samples:
                assert (samples[0] - rank * share) % batch_size == 0, "a worker's range starts on a batch boundary"
            rank_samples += samples
            batch_counts.append(len(worker_plan.batch_sizes))
            batches += list(worker_plan.batch_sizes)
        # Contiguous, in worker order: the rank's range exactly.
        assert rank_samples == list(range(rank * share, (rank + 1) * share))
        assert len(batches) == math.ceil(share / batch_size)
        assert max(batch_counts) - min(batch_counts) <= 1
        short = [size for size in batches if size != batch_size]
        assert short == ([share % batch_size] if share % batch_size else [])
        read += rank_samples
    assert sorted(read) == list(range(share * world_size)) and len(set(read)) == len(read)


@given(sizes=shard_sizes, world_size=ranks, num_workers=st.integers(0, 4), batch_size=batch_sizes)
def test_a_ranks_batch_count_is_the_same_on_every_rank_whatever_the_workers(sizes, world_size, num_workers, batch_size):
    """`len(loader)` (docs/DATA.md): exact epochs give ceil((total // world_size) / batch_size)
    batches on every rank, with any number of dataloader workers (0 means the main process reads
    as one worker)."""
    shards = make_shards(sizes)
    expected = math.ceil((sum(sizes) // world_size) / batch_size)
    for rank in range(world_size):
        dataset = ShardDataset(shards, phase_settings(rank, world_size, num_workers, batch_size, limit=None), None)
        assert len(dataset) == expected


def phase_settings(rank, world_size, num_workers, batch_size, *, limit, resample=False) -> PhaseSettings:
    return PhaseSettings(
        phase="train",
        seed=3,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        batch_size=batch_size,
        shuffle_shards=True,
        shuffle_buffer=0,
        limit=limit,
        resample=resample,
        max_bad_fraction=0.01,
    )


# --- capped epochs ------------------------------------------------------------------------------


@given(
    n_shards=st.integers(1, 24),
    world_size=ranks,
    num_workers=workers,
    batch_size=batch_sizes,
    limit=st.integers(1, 400),
    resample=st.booleans(),
)
def test_capped_epoch_yields_full_batches_up_to_the_cap_from_disjoint_shards(
    n_shards, world_size, num_workers, batch_size, limit, resample
):
    """Capped epochs (docs/DATA.md): each rank yields limit // (world_size * batch_size) full
    batches, split among its workers as evenly as possible, so no rank reads past the cap; without
    resampling every (rank, worker) reader gets its own shards (shards[slot::readers]): disjoint,
    together all of them, and fewer shards than readers is a DataSetupError; with resampling each
    reader draws from all shards. A cap below one batch per rank is a DataSetupError."""
    order = make_shards([5] * n_shards)
    readers = world_size * num_workers
    per_rank = limit // (world_size * batch_size)

    def worker_plan(rank, worker):
        return plan.capped_worker_plan(
            order,
            limit=limit,
            rank=rank,
            world_size=world_size,
            worker=worker,
            workers=num_workers,
            batch_size=batch_size,
            resample=resample,
            what="train.epoch_samples",
        )

    if per_rank == 0 or (not resample and n_shards < readers):
        with pytest.raises(plan.DataSetupError):
            worker_plan(0, 0)
        return
    seen: Dict[int, Tuple[int, int]] = {}
    for rank in range(world_size):
        counts = []
        for worker in range(num_workers):
            worker_plan_ = worker_plan(rank, worker)
            assert set(worker_plan_.batch_sizes) <= {batch_size}
            counts.append(len(worker_plan_.batch_sizes))
            if resample:
                assert {s.number for s in worker_plan_.shards} == set(range(n_shards))
                continue
            assert worker_plan_.shards, "every reader has a shard"
            for shard in worker_plan_.shards:
                assert shard.number not in seen, f"shard {shard.number} read by {seen.get(shard.number)} too"
                seen[shard.number] = (rank, worker)
        assert sum(counts) == per_rank and max(counts) - min(counts) <= 1
        assert sum(counts) * batch_size * world_size <= limit
    if not resample:
        assert set(seen) == set(range(n_shards))
        per_reader = [
            sum(1 for owner in seen.values() if owner == (r, w)) for r in range(world_size) for w in range(num_workers)
        ]
        assert max(per_reader) - min(per_reader) <= 1


@given(
    n_shards=st.integers(1, 24),
    world_size=ranks,
    num_workers=st.integers(0, 4),
    batch_size=batch_sizes,
    limit=st.integers(1, 400),
)
def test_capped_batch_count_is_the_cap_over_ranks_and_batches(n_shards, world_size, num_workers, batch_size, limit):
    """`len(loader)` in capped mode (docs/DATA.md): limit // (world_size * batch_size) on every rank."""
    readers = world_size * max(1, num_workers)
    assume(limit >= world_size * batch_size and n_shards >= readers)
    shards = make_shards([5] * n_shards)
    for rank in range(world_size):
        dataset = ShardDataset(shards, phase_settings(rank, world_size, num_workers, batch_size, limit=limit), None)
        assert len(dataset) == limit // (world_size * batch_size)


# --- splits and shard order ---------------------------------------------------------------------

fractions = st.tuples(*[st.integers(0, 20)] * 3).filter(lambda f: sum(f) > 0)


@given(n_shards=st.integers(0, 40), weights=fractions, seed=st.integers(0, 2**31))
def test_splits_deal_every_shard_once_by_largest_remainder(n_shards, weights, seed):
    """Splits (docs/DATA.md): the shards are dealt into disjoint train/val/test sets that together
    hold every shard; a split with fraction 0 gets none; when there are at least as many shards as
    splits asked for, each of them gets one; and when every asked-for split's exact share
    n * fraction / sum is at least 1, counts follow largest-remainder rounding: each is its share
    rounded down or up, the sum is n, and a split rounded up never has a smaller remainder than
    one rounded down. The same seed deals the same way."""
    names = ("train", "val", "test")
    shares = dict(zip(names, weights))
    shards = make_shards([1] * n_shards)
    dealt = plan.split_shards(shards, shares, seed)
    assert dealt == plan.split_shards(shards, dict(shares), seed)
    numbers = [shard.number for name in names for shard in dealt[name]]
    assert sorted(numbers) == list(range(n_shards))
    for name in names:
        assert [s.number for s in dealt[name]] == sorted(s.number for s in dealt[name])
    counts = {name: len(dealt[name]) for name in names}
    asked = [name for name in names if shares[name] > 0]
    assert all(counts[name] == 0 for name in names if shares[name] == 0)
    if n_shards >= len(asked):
        assert all(counts[name] >= 1 for name in asked)
    total = sum(weights)
    exact = {name: n_shards * shares[name] / total for name in names}
    if all(exact[name] >= 1 for name in asked):
        floors = {name: (n_shards * shares[name]) // total for name in names}
        remainders = {name: (n_shards * shares[name]) % total for name in names}  # in units of 1 / total
        up = [name for name in names if counts[name] == floors[name] + 1]
        down = [name for name in names if counts[name] == floors[name]]
        assert len(up) + len(down) == 3
        assert all(remainders[a] >= remainders[b] for a in up for b in down)


@given(n_shards=st.integers(0, 30), seed=st.integers(0, 1000), epoch=st.integers(0, 50), shuffle=st.booleans())
def test_epoch_order_is_a_permutation_set_by_seed_and_epoch(n_shards, seed, epoch, shuffle):
    """Each epoch reads the split's shards in an order that is a permutation of them, by number
    without `shuffle_train`, and the same for the same (seed, epoch) on every rank."""
    shards = make_shards([2] * n_shards)
    first = plan.epoch_order(list(reversed(shards)), shuffle=shuffle, seed=seed, epoch=epoch)
    again = plan.epoch_order(shards, shuffle=shuffle, seed=seed, epoch=epoch)
    assert sorted(s.number for s in first) == list(range(n_shards))
    assert first == again
    if not shuffle:
        assert [s.number for s in first] == list(range(n_shards))


# --- the evaluation's shares --------------------------------------------------------------------


class _Collective:
    """A sum over `world_size` threads standing in for ranks (what accelerate's reduce does)."""

    def __init__(self, world_size: int):
        # a rank that waits for a collective the others never reach fails in seconds, not forever
        self.barrier = threading.Barrier(world_size, timeout=20)
        self.values: Dict[int, torch.Tensor] = {}

    def sum(self, rank: int, value: torch.Tensor) -> torch.Tensor:
        self.values[rank] = value
        self.barrier.wait()
        total = sum(self.values.values())
        self.barrier.wait()
        return total


class _FakeAccelerator:
    def __init__(self, rank: int, world_size: int, collective: _Collective):
        self.process_index, self.num_processes, self.collective = rank, world_size, collective
        self.device = torch.device("cpu")
        self.collectives = 0

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        self.collectives += 1
        return self.collective.sum(self.process_index, torch.as_tensor(tensor).clone())


class _FakeLoader:
    """A rank's exact validation loader: `available` samples in batches of `batch_size`."""

    def __init__(self, available: int, batch_size: int):
        self.available, self.batch_size = available, batch_size
        self.batches_read = 0

    def __len__(self):
        return math.ceil(self.available / self.batch_size)

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        for start in range(0, self.available, self.batch_size):
            self.batches_read += 1
            size = min(self.batch_size, self.available - start)
            yield {"image": torch.zeros(size, 3, 4, 4), "image_embed": torch.zeros(size, 2)}


class _FakeDecoder:
    UNET_CALLS = 3

    def sample(self, image_embed, on_unet_call=None, **options):
        for _ in range(self.UNET_CALLS):  # where the real sampler checks before each U-Net call
            if on_unet_call is not None:
                on_unet_call(1)
        return torch.rand(image_embed.shape[0], 3, 4, 4)


class _CountingSuite:
    notes: List[str] = []

    def __init__(self):
        self.real = 0

    def reset(self):
        self.real = 0

    def update(self, real, generated, embeddings=None):
        assert real.shape[0] == generated.shape[0]
        self.real += real.shape[0]

    def compute(self, seed=0):
        return {}


def evaluate_on_ranks(n_samples: int, world_size: int, available: int, batch_size: int, *, stop: bool = False):
    """evaluate_decoder run by `world_size` threads, one per rank; per rank (images, batches, logged
    count, collectives taken part in). `stop`: with a stop request (never signalled), whose checks
    before each batch and U-Net call are collectives every rank must reach."""
    from dalle2_decoder.stopping import StopRequest

    collective = _Collective(world_size)
    results: Dict[int, Tuple[int, int, float, int]] = {}
    errors: List[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            loader, suite = _FakeLoader(available, batch_size), _CountingSuite()
            accelerator = _FakeAccelerator(rank, world_size, collective)
            metrics = evaluate_decoder(
                _FakeDecoder(),
                loader,
                lambda batch: batch,
                accelerator,
                suite,
                n_samples=n_samples,
                unets=[1],
                image_size=4,
                stop=StopRequest() if stop else None,
            )
            results[rank] = (suite.real, loader.batches_read, metrics["eval/samples"], accelerator.collectives)
        except BaseException as error:  # reported by the main thread
            errors.append(error)
            collective.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results


@given(n_samples=st.integers(0, 10**6), world_size=st.integers(1, 64))
def test_per_rank_shares_add_up_to_the_request(n_samples, world_size):
    """`samples_per_rank(n, ranks, rank)`: n // ranks on every rank and one more on the first
    n % ranks, so the shares add up to exactly n; without a rank, the largest share, ceil(n / ranks)."""
    shares = [samples_per_rank(n_samples, world_size, rank) for rank in range(world_size)]
    assert sum(shares) == n_samples
    assert shares == sorted(shares, reverse=True) and max(shares) - min(shares) <= (1 if shares else 0)
    assert samples_per_rank(n_samples, world_size) == max(shares) == -(-n_samples // world_size)


evaluation_counts = dict(
    n_samples=st.integers(1, 60), world_size=st.integers(1, 4), available=st.integers(0, 30), batch_size=batch_sizes
)


@settings(max_examples=40)
@given(**evaluation_counts)
def test_evaluation_pools_at_least_what_was_asked_and_reads_no_batch_in_vain(
    n_samples, world_size, available, batch_size
):
    """Evaluation shares (docs/EVALUATION.md): each rank reads its share of the validation split,
    at most ceil(n_evaluation_samples / ranks) samples and no batch beyond it; `eval/samples` is
    the number of images the metrics received over all ranks, the same on every rank; it is never
    less than min(n_evaluation_samples, what the split holds over all ranks), and only falls
    short of the request when the split is smaller."""
    results = evaluate_on_ranks(n_samples, world_size, available, batch_size)
    quota = math.ceil(n_samples / world_size)
    pooled = sum(images for images, *_ in results.values())
    for images, batches_read, logged, _ in results.values():
        assert images <= min(quota, available)
        assert batches_read <= math.ceil(min(quota, available) / batch_size)
        assert logged == pooled
    assert pooled >= min(n_samples, world_size * available)


@settings(max_examples=40)
@given(**evaluation_counts)
def test_evaluation_pools_exactly_the_requested_number_when_the_split_has_it(
    n_samples, world_size, available, batch_size
):
    """Issue 29's invariant for any request and rank count: the metrics see exactly
    min(n_evaluation_samples, what the split holds over all ranks) images, so the same request
    gives a value over the same number of images on 1, 2 or 3 ranks."""
    results = evaluate_on_ranks(n_samples, world_size, available, batch_size)
    assert sum(images for images, *_ in results.values()) == min(n_samples, world_size * available)


@settings(max_examples=40)
@given(**evaluation_counts)
def test_every_rank_takes_part_in_the_same_stop_checks_whatever_its_share(n_samples, world_size, available, batch_size):
    """Stop checks are collectives (docs/TRAINING.md): every rank reaches the same number of them in
    an evaluation, also when the shares differ by one and so would need different numbers of
    batches (a rank with its share done samples one image it does not count); the images pooled
    stay exactly the request, or what the split holds."""
    results = evaluate_on_ranks(n_samples, world_size, available, batch_size, stop=True)
    assert len({collectives for *_, collectives in results.values()}) == 1
    assert sum(images for images, *_ in results.values()) == min(n_samples, world_size * available)
