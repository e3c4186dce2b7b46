"""Which shards exist, which split they belong to, and which samples each rank and worker reads.

Two ways to run an epoch (see docs/DATA.md):

- exact (no sample limit): the shards' sample counts are known, the (epoch-shuffled) shard
  sequence is cut into one contiguous sample range per rank, each of the same length (the
  fewer-than-`world_size` samples left over are dropped and reported), and each rank's range
  into batch-aligned ranges per worker. Every sample is read once, by one worker, and every
  rank yields `ceil(per_rank_samples / batch_size)` batches. Ranges may start or end inside a
  shard, so there can be fewer shards than ranks x workers.
- capped (`epoch_samples` / `validation_samples` given, or resampling): every rank yields
  `limit // (world_size * batch_size)` full batches, shared among its workers; each worker reads
  its own disjoint subset of shards, cycling through it (or drawing shards with replacement
  when resampling) until it has filled its batches.
"""

from __future__ import annotations

import logging
import math
import random
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import attrs

from ..failures import EXIT_DATA
from . import sources
from .tar_reader import count_local_tar_samples, count_stream_samples, not_a_tar_reason

log = logging.getLogger(__name__)


class DataSetupError(ValueError):
    """The data configuration cannot be served: missing shards, no shards in range, too few shards."""

    exit_status: ClassVar[int] = EXIT_DATA


@attrs.frozen
class Shard:
    number: int
    url: str
    img_embeddings_url: Optional[str] = None
    text_embeddings_url: Optional[str] = None
    size: Optional[int] = None
    """Samples in the shard, when counted (exact mode)."""
    size_source: Optional[str] = None
    """The `sizes.json` the size was taken from (named in messages that rely on it); None: counted."""


@attrs.frozen
class Piece:
    """Samples `start <= ordinal < stop` (archive order) of one shard; stop None: to the end."""

    shard: Shard
    start: int = 0
    stop: Optional[int] = None


@attrs.frozen
class WorkerPlan:
    """What one dataloader worker of one rank reads in one epoch."""

    batch_sizes: Tuple[int, ...]
    """The size of each batch this worker yields, in order (exact: the last may be short)."""
    pieces: Tuple[Piece, ...] = ()
    """Exact mode: the sample ranges to read, in order."""
    shards: Tuple[Shard, ...] = ()
    """Capped mode: the shards this worker cycles through (or draws from, when resampling)."""
    resample: bool = False

    @property
    def samples(self) -> int:
        return sum(self.batch_sizes)


def shard_ranges(numbers: Sequence[int]) -> str:
    """'3, 7-9, 12' for [3, 7, 8, 9, 12]."""
    parts, numbers = [], sorted(numbers)
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        parts.append(str(numbers[i]) if i == j else f"{numbers[i]}-{numbers[j]}")
        i = j + 1
    return ", ".join(parts)


def discover_shards(
    base_url: str,
    *,
    start_shard: int,
    end_shard: int,
    shard_width: int,
    img_embeddings_url: Optional[str] = None,
    text_embeddings_url: Optional[str] = None,
    skip_missing_shards: bool = False,
) -> List[Shard]:
    """The shards of the configured range that can be read, each with its embedding files.

    Listable sources (local, s3, other fsspec stores) are listed: with the default `end_shard`
    the range ends at the last shard found, and shard numbers missing inside the range are all
    reported in one error (or, with `skip_missing_shards`, one warning). http and `pipe:` sources
    cannot be listed, so they need an explicit `end_shard`; a shard missing there is found when it
    is read and counted as bad data. With the default `end_shard` only gaps between the first and
    last shard found count as missing; with an explicit one, every number of the range must exist.
    Shards without an embedding file (when embedding folders are given) are left out with a warning.
    """
    sources.check_base_url(base_url)
    if end_shard < start_shard:
        raise DataSetupError(f"data.end_shard ({end_shard}) is below data.start_shard ({start_shard})")
    existing = sources.list_shard_numbers(base_url, shard_width)
    if existing is None:
        if end_shard == sources.END_SHARD_UNSET:
            raise DataSetupError(
                f"data.end_shard must be set for {base_url!r}: http and pipe: shards cannot be listed, "
                "so the last shard number has to be given"
            )
        numbers = list(range(start_shard, end_shard + 1))
    else:
        in_range = [n for n in existing if start_shard <= n <= end_shard]
        if not in_range:
            raise DataSetupError(
                f"no shard of {base_url!r} found with a number in {start_shard}..{end_shard} "
                f"(shard_width {shard_width})"
            )
        # An explicit end_shard asks for the whole range; with the default one the range is what
        # was found, from the first to the last shard, and only gaps inside it are missing.
        first, last = (in_range[0], in_range[-1]) if end_shard == sources.END_SHARD_UNSET else (start_shard, end_shard)
        present = set(in_range)
        missing = [n for n in range(first, last + 1) if n not in present]
        if missing:
            message = f"{len(missing)} shard(s) of {base_url!r} missing in {first}..{last}: {shard_ranges(missing)}"
            if not skip_missing_shards:
                raise DataSetupError(message + " (set data.skip_missing_shards to leave them out)")
            log.warning("%s; leaving them out (data.skip_missing_shards)", message)
        numbers = in_range
    shards = [Shard(n, sources.shard_url(base_url, n, shard_width)) for n in numbers]
    for field, folder in (("img_embeddings_url", img_embeddings_url), ("text_embeddings_url", text_embeddings_url)):
        if folder is None:
            continue
        files = sources.list_embedding_files(folder)
        without = [shard.number for shard in shards if shard.number not in files]
        if without:
            log.warning(
                "%d shard(s) have no embedding file in %s (data.%s) and are skipped: %s",
                len(without),
                folder,
                field,
                shard_ranges(without),
            )
        shards = [attrs.evolve(s, **{field: files[s.number]}) for s in shards if s.number in files]
    if not shards:
        raise DataSetupError(f"no readable shard of {base_url!r} in {start_shard}..{end_shard}")
    return shards


def configured_shards(data_config, *, embedding_folders: bool = True) -> List[Shard]:
    """`discover_shards` over the range a `DataConfig` names; `embedding_folders=False` leaves its
    embedding folders out (shards then keep no embedding files and none is left out for lacking one)."""
    return discover_shards(
        data_config.webdataset_base_url,
        start_shard=data_config.start_shard,
        end_shard=data_config.end_shard,
        shard_width=data_config.shard_width,
        img_embeddings_url=data_config.img_embeddings_url if embedding_folders else None,
        text_embeddings_url=data_config.text_embeddings_url if embedding_folders else None,
        skip_missing_shards=data_config.skip_missing_shards,
    )


def split_shards(shards: Sequence[Shard], fractions: Dict[str, float], seed: int) -> Dict[str, List[Shard]]:
    """Shards dealt into disjoint splits in proportion to `fractions`, shuffled by `seed`.

    Largest-remainder rounding; each split with a positive fraction gets at least one shard when
    there are enough shards. Every rank computes the same result from the same seed.
    """
    names = list(fractions)
    total = sum(fractions.values())
    if total <= 0:
        raise DataSetupError("data.splits must have a positive fraction")
    order = list(shards)
    random.Random(seed).shuffle(order)
    n = len(order)
    exact = [fractions[name] / total * n for name in names]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(names)), key=lambda i: counts[i] - exact[i])[: n - sum(counts)]:
        counts[i] += 1
    # A split asked for gets a shard, taken from the largest, if there are shards enough.
    for i, name in enumerate(names):
        if fractions[name] > 0 and counts[i] == 0:
            donor = max(range(len(names)), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    result, at = {}, 0
    for name, count in zip(names, counts):
        result[name] = sorted(order[at : at + count], key=lambda s: s.number)
        at += count
    return result


def count_samples(shards: Sequence[Shard], base_url: str) -> List[Shard]:
    """The shards with `size` filled in: from `sizes.json` beside the shards when its entry is
    confirmed, else by reading the tar headers (local) or streaming the shard (remote, pipe:).

    An entry is confirmed when the byte size it records is the shard's size now (a stat or an
    fsspec info request). Entries without a byte size (the older format) are confirmed by counting
    for local shards, and trusted for remote and pipe: ones, where counting means streaming the
    shard; a shard whose size came from `sizes.json` carries its URL, so messages can name it.
    """
    sizes_url, known = sources.read_sizes_file(base_url)
    counted = []
    stale: List[str] = []
    for shard in shards:
        name = sources.shard_file_name(shard.url)
        size, source = None, None
        local = sources.url_kind(shard.url) == "local"
        if name in known:
            samples, recorded_bytes = known[name]
            if recorded_bytes is not None:
                actual = sources.byte_size(shard.url)
                if actual is None or actual == recorded_bytes:
                    size, source = samples, sizes_url
                else:
                    stale.append(f"{name} ({recorded_bytes} bytes recorded, {actual} now)")
            elif not local:
                size, source = samples, sizes_url
        if size is None:
            size = _count(shard)
            if name in known and known[name][1] is None and size != known[name][0]:
                stale.append(f"{name} ({known[name][0]} samples recorded, {size} counted)")
        counted.append(attrs.evolve(shard, size=size, size_source=source))
    if stale:
        log.warning(
            "%s is stale for %d shard(s), which were counted instead: %s%s",
            sizes_url,
            len(stale),
            ", ".join(stale[:5]),
            ", ..." if len(stale) > 5 else "",
        )
    return counted


def _count(shard: Shard) -> int:
    if sources.url_kind(shard.url) == "local":
        if not sources.exists_locally(shard.url):
            return 0
        path = sources.local_path(shard.url)
        try:
            reason = not_a_tar_reason(path)
        except OSError as error:
            log.warning("cannot read shard %s to count its samples: %s", shard.url, error)
            return 0
        if reason:
            log.warning("not a tar archive: %s (%s); it contributes no samples", shard.url, reason)
            return 0
        return count_local_tar_samples(path)
    try:
        with sources.open_stream(shard.url) as stream:
            return count_stream_samples(stream)
    except Exception as error:  # unreadable: it contributes no samples
        log.warning("cannot read shard %s to count its samples: %s", shard.url, error)
        return 0


def epoch_order(shards: Sequence[Shard], *, shuffle: bool, seed: int, epoch: int) -> List[Shard]:
    order = sorted(shards, key=lambda s: s.number)
    if shuffle:
        random.Random(f"{seed}-{epoch}-shards").shuffle(order)
    return order


def _batch_split(n_batches: int, workers: int, worker: int) -> Tuple[int, int]:
    """Contiguous batch range [first, first + count) of one worker."""
    base, extra = divmod(n_batches, workers)
    first = worker * base + min(worker, extra)
    return first, base + (1 if worker < extra else 0)


def exact_rank_samples(total: int, world_size: int) -> int:
    return total // world_size


def exact_worker_plan(
    order: Sequence[Shard], *, rank: int, world_size: int, worker: int, workers: int, batch_size: int
) -> WorkerPlan:
    """Exact mode: the sample ranges and batch sizes of one worker of one rank (see module doc)."""
    total = sum(shard.size for shard in order)
    per_rank = exact_rank_samples(total, world_size)
    n_batches = math.ceil(per_rank / batch_size)
    first_batch, count = _batch_split(n_batches, workers, worker)
    local_start = first_batch * batch_size
    local_stop = min((first_batch + count) * batch_size, per_rank)
    batch_sizes = tuple(min(batch_size, local_stop - start) for start in range(local_start, local_stop, batch_size))
    start, stop = rank * per_rank + local_start, rank * per_rank + local_stop
    pieces, offset = [], 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + shard.size)
        if lo < hi:
            pieces.append(Piece(shard, lo - offset, hi - offset))
        offset += shard.size
    return WorkerPlan(batch_sizes=batch_sizes, pieces=tuple(pieces))


def capped_batches_per_rank(limit: int, world_size: int, batch_size: int, what: str) -> int:
    n = limit // (world_size * batch_size)
    if n == 0:
        raise DataSetupError(
            f"{what}={limit} is less than one batch per rank (world_size {world_size} x batch_size {batch_size})"
        )
    return n


def capped_worker_plan(
    order: Sequence[Shard],
    *,
    limit: int,
    rank: int,
    world_size: int,
    worker: int,
    workers: int,
    batch_size: int,
    resample: bool,
    what: str,
) -> WorkerPlan:
    """Capped mode: full batches for one worker, and the shards it reads (see module doc)."""
    n_batches = capped_batches_per_rank(limit, world_size, batch_size, what)
    _, count = _batch_split(n_batches, workers, worker)
    if resample:
        shards = tuple(order)
    else:
        slots = world_size * workers
        if len(order) < slots:
            raise DataSetupError(
                f"{len(order)} shard(s) for {world_size} rank(s) x {workers} worker(s) = {slots} readers: "
                f"with {what} set, each reader needs its own shard. Use fewer data.num_workers, more shards, "
                "or leave the sample limit unset (exact epochs split shards by sample)"
            )
        shards = tuple(order[rank * workers + worker :: slots])
    return WorkerPlan(batch_sizes=(batch_size,) * count, shards=shards, resample=resample)


# --- the rest of an epoch, for another number of processes or workers -----------------------------


@attrs.frozen
class Frontier:
    """How far one worker got through its plan when its latest batch was made (exact mode).

    `cursor` (piece index, next ordinal): samples of its pieces before it were read, those from it
    on not yet; `pending`: samples read but in no batch yet (in the shuffle buffer, or held back
    while the expected image size is decided), as (shard number, ordinal). A sample read and found
    bad counts as done.
    """

    cursor: Tuple[int, int]
    pending: Tuple[Tuple[int, int], ...] = ()

    def to_dict(self) -> Dict[str, list]:
        return {"cursor": list(self.cursor), "pending": [list(item) for item in self.pending]}

    @classmethod
    def from_dict(cls, values) -> "Frontier":
        return cls(tuple(values["cursor"]), tuple(tuple(item) for item in values.get("pending", ())))


def unread(plan: WorkerPlan, frontier: Optional[Frontier]) -> List[Piece]:
    """The samples of one worker's plan not yet in a batch: its pending ones, then its unread pieces."""
    if frontier is None:  # the worker made no batch yet: all of it
        return list(plan.pieces)
    by_number = {piece.shard.number: piece.shard for piece in plan.pieces}
    rest = [Piece(by_number[number], ordinal, ordinal + 1) for number, ordinal in frontier.pending]
    index, ordinal = frontier.cursor
    for position, piece in enumerate(plan.pieces):
        if position < index:
            continue
        start = max(piece.start, ordinal) if position == index else piece.start
        if piece.stop is None or start < piece.stop:
            rest.append(Piece(piece.shard, start, piece.stop))
    return rest


def piece_samples(piece: Piece) -> int:
    return (piece.stop if piece.stop is not None else piece.shard.size) - piece.start


def slice_pieces(pieces: Sequence[Piece], start: int, stop: int) -> Tuple[Piece, ...]:
    """Samples `start <= i < stop` of the concatenation of `pieces`, as pieces."""
    out, offset = [], 0
    for piece in pieces:
        size = piece_samples(piece)
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            out.append(Piece(piece.shard, piece.start + lo - offset, piece.start + hi - offset))
        offset += size
    return tuple(out)


@attrs.frozen
class RestOfEpoch:
    """The samples an epoch still has to train on, dealt to a new set of ranks and workers.

    Built when a run resumes inside an epoch with another number of processes (or dataloader
    workers) than the run that saved it: the old ranks' workers' unread samples, in (rank,
    worker) order, are cut into one contiguous range per new rank, `total // world_size` samples
    each and one more for the first `total % world_size` ranks, so every sample left is read
    once. Each rank yields `ceil((total // world_size) / batch_size)` batches (the same count on
    every rank); a rank with the extra sample has it in its last batch. Within a rank the
    batches are split among its workers as in an exact epoch.
    """

    pieces: Tuple[Piece, ...]

    @property
    def total(self) -> int:
        return sum(piece_samples(piece) for piece in self.pieces)

    def rank_range(self, rank: int, world_size: int) -> Tuple[int, int]:
        share, extra = divmod(self.total, world_size)
        start = rank * share + min(rank, extra)
        return start, start + share + (1 if rank < extra else 0)

    def rank_batch_sizes(self, rank: int, world_size: int, batch_size: int) -> List[int]:
        """The sizes of one rank's batches, in plan order (not the order its workers deliver them)."""
        share = self.total // world_size
        if share == 0:
            return []
        count = math.ceil(share / batch_size)
        sizes = [batch_size] * (count - 1) + [share - (count - 1) * batch_size]
        start, stop = self.rank_range(rank, world_size)
        sizes[-1] += (stop - start) - share
        return sizes

    def worker_plan(self, *, rank: int, world_size: int, worker: int, workers: int, batch_size: int) -> WorkerPlan:
        sizes = self.rank_batch_sizes(rank, world_size, batch_size)
        first, count = _batch_split(len(sizes), workers, worker)
        start = self.rank_range(rank, world_size)[0] + sum(sizes[:first])
        mine = tuple(sizes[first : first + count])
        return WorkerPlan(batch_sizes=mine, pieces=slice_pieces(self.pieces, start, start + sum(mine)))

    def to_list(self) -> List[List[int]]:
        return [[piece.shard.number, piece.start, piece_samples(piece) + piece.start] for piece in self.pieces]

    @classmethod
    def from_list(cls, values: Sequence[Sequence[int]], shards: Sequence[Shard]) -> "RestOfEpoch":
        by_number = {shard.number: shard for shard in shards}
        missing = sorted({int(number) for number, _, _ in values} - set(by_number))
        if missing:
            raise DataSetupError(
                f"the epoch to continue reads shard(s) {shard_ranges(missing)}, which the train split no longer has"
            )
        return cls(tuple(Piece(by_number[int(n)], int(start), int(stop)) for n, start, stop in values))


def rest_of_epoch(
    old_plans: Sequence[Sequence[WorkerPlan]], frontiers: Sequence[Sequence[Optional[Frontier]]]
) -> RestOfEpoch:
    """What the old ranks' workers (`old_plans[rank][worker]`, where each got to `frontiers[rank][worker]`)
    left of an epoch, in (rank, worker) order."""
    pieces: List[Piece] = []
    for plans, reached in zip(old_plans, frontiers):
        for plan, frontier in zip(plans, reached):
            pieces.extend(unread(plan, frontier))
    return RestOfEpoch(tuple(pieces))


def delivery_order(batch_counts: Sequence[int]) -> List[Tuple[int, int]]:
    """(worker, its batch index) of each batch of a rank in the order its loader delivers them:
    round robin over the workers that still have batches (as torch's DataLoader does)."""
    order, taken = [], [0] * len(batch_counts)
    while len(order) < sum(batch_counts):
        for worker, count in enumerate(batch_counts):
            if taken[worker] < count:
                order.append((worker, taken[worker]))
                taken[worker] += 1
    return order
