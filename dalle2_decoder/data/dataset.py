"""The per-worker sample stream: read the planned shard ranges, attach embeddings, shuffle,
decode, validate, batch.

Runs inside each dataloader worker process (or in the main process when num_workers is 0).
Batches are built here, so a batch of images crosses the process boundary once; each batch
carries the worker's running counts under `STATS_KEY`, which the loader takes out.
"""

from __future__ import annotations

import collections
import logging
import random
from typing import Dict, Iterator, List, Optional

import attrs
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import shuffle as wds_shuffle

from . import plan as planning
from . import sources
from .decode import (  # the member names: preflight reads them from here
    IMAGE_EMBED_MEMBERS,  # noqa: F401
    TEXT_EMBED_MEMBERS,  # noqa: F401
    SampleFormat,
    decode_sample,
)
from .stats import BadDataError, check_bad_fraction, format_counts, new_counts
from .tar_reader import ShardReadError, iter_tar_samples

log = logging.getLogger(__name__)

STATS_KEY = "__stats__"
SIZE_VOTE = 16  # good images whose most common size is the expected one, when the preprocessing fixes none
MAX_CONSECUTIVE_BAD = 100_000  # a worker that finds nothing usable for this long stops (capped mode)


@attrs.define
class PhaseSettings:
    """Everything one phase's dataset needs besides the shards; picklable for worker processes."""

    phase: str
    seed: int
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    shuffle_shards: bool
    shuffle_buffer: int
    limit: Optional[int]
    """None: exact epochs; else samples per epoch across all ranks (capped mode)."""
    resample: bool
    max_bad_fraction: float
    limit_name: str = "epoch_samples"


class _Frontier:
    """What one worker has read of its exact plan and not yet put in a batch (see `planning.Frontier`)."""

    def __init__(self, plan: planning.WorkerPlan):
        self.cursor = (0, plan.pieces[0].start if plan.pieces else 0)
        self.pending: Dict[tuple, None] = {}  # insertion-ordered set

    def read(self, piece_index: int, sample_id: tuple) -> None:
        self.cursor = (piece_index, sample_id[1] + 1)
        self.pending[sample_id] = None

    def done(self, sample_id: Optional[tuple]) -> None:
        if sample_id is not None:
            self.pending.pop(tuple(sample_id), None)

    def report(self) -> dict:
        return planning.Frontier(self.cursor, tuple(self.pending)).to_dict()


class ShardDataset(IterableDataset):
    """One phase's samples for one rank; `epoch` selects the shuffle (set it before iterating).

    `rest`: (epoch, `planning.RestOfEpoch`) when that epoch continues with what an interrupted run
    (with another number of ranks or workers) left of it, instead of the epoch's own plan.
    """

    def __init__(self, shards: List[planning.Shard], settings: PhaseSettings, sample_format: SampleFormat):
        super().__init__()
        self.shards = list(shards)
        self.settings = settings
        self.format = sample_format
        self.epoch = 0
        self.rest: Optional[tuple] = None
        self.first_problems: Dict[str, str] = {}
        """The first bad sample of each reason in this process, with what was wrong (for messages)."""

    # ----- planning -------------------------------------------------------------------------

    def rest_of_epoch(self) -> Optional[planning.RestOfEpoch]:
        """The rest-of-epoch plan of the current epoch, if it has one."""
        return self.rest[1] if self.rest is not None and self.rest[0] == self.epoch else None

    def worker_plan(self, worker: int) -> planning.WorkerPlan:
        s = self.settings
        workers = max(1, s.num_workers)
        rest = self.rest_of_epoch()
        if rest is not None:
            return rest.worker_plan(
                rank=s.rank, world_size=s.world_size, worker=worker, workers=workers, batch_size=s.batch_size
            )
        order = planning.epoch_order(self.shards, shuffle=s.shuffle_shards, seed=s.seed, epoch=self.epoch)
        if s.limit is None:
            return planning.exact_worker_plan(
                order, rank=s.rank, world_size=s.world_size, worker=worker, workers=workers, batch_size=s.batch_size
            )
        return planning.capped_worker_plan(
            order,
            limit=s.limit,
            rank=s.rank,
            world_size=s.world_size,
            worker=worker,
            workers=workers,
            batch_size=s.batch_size,
            resample=s.resample,
            what=s.limit_name,
        )

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        workers = max(1, self.settings.num_workers)
        return sum(len(self.worker_plan(w).batch_sizes) for w in range(workers))

    def global_batch_samples(self) -> List[int]:
        """Samples of each of the epoch's batches summed over all ranks, in delivery order: the same
        on every rank (`size x ranks`, except in a rest of epoch, where ranks may differ by one)."""
        s = self.settings
        workers = max(1, s.num_workers)
        rest = self.rest_of_epoch()
        ranks = range(s.world_size) if rest is not None else [s.rank]
        totals: List[int] = []
        for rank in ranks:
            if rest is not None:
                plans = [
                    rest.worker_plan(
                        rank=rank, world_size=s.world_size, worker=w, workers=workers, batch_size=s.batch_size
                    )
                    for w in range(workers)
                ]
            else:
                plans = [self.worker_plan(w) for w in range(workers)]
            order = planning.delivery_order([len(plan.batch_sizes) for plan in plans])
            sizes = [plans[worker].batch_sizes[index] for worker, index in order]
            totals = [a + b for a, b in zip(totals, sizes)] if totals else sizes
        return totals if rest is not None else [size * s.world_size for size in totals]

    # ----- iteration ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        s = self.settings
        plan = self.worker_plan(worker)
        if not plan.batch_sizes:
            return
        counts = new_counts()
        seed = f"{s.seed}-{self.epoch}-{s.phase}-{s.rank}-{worker}" + ("-rest" if self.rest_of_epoch() else "")
        rng = random.Random(seed)
        # Exact epochs: what this worker has read and not yet batched, reported with every batch, so
        # a run resumed with other ranks or workers knows which samples of the epoch are left.
        frontier = _Frontier(plan) if s.limit is None else None
        raw = self._raw_exact(plan, counts, frontier) if s.limit is None else self._raw_capped(plan, counts, rng)
        if s.shuffle_buffer > 1:
            # Shuffle encoded samples (small), not decoded images.
            raw = wds_shuffle(s.shuffle_buffer, initial=min(100, s.shuffle_buffer), rng=rng)(raw)
        where = f"data ({s.phase}, rank {s.rank}, worker {worker})"
        samples = self._decoded(raw, counts, where, frontier)
        recent: collections.deque = collections.deque(maxlen=max(plan.batch_sizes))
        for number, size in enumerate(plan.batch_sizes):
            batch = []
            while len(batch) < size:
                sample = next(samples, None)
                if sample is None:
                    if not recent:
                        check_bad_fraction(
                            counts, s.max_bad_fraction, where, final=True, first_problems=self.first_problems
                        )
                        raise BadDataError(
                            f"{where}: no readable sample in its share of the data "
                            f"({len(plan.pieces) or len(plan.shards)} shard range(s)), so its batches cannot "
                            f"be filled: {format_counts(counts)}; {self._first_problem_text()}".rstrip("; ")
                        )
                    # Bad samples were skipped: repeat recent good ones so every rank yields
                    # the same number of batches of the planned sizes.
                    sample = recent[rng.randrange(len(recent))]
                    counts["padded"] += 1
                else:
                    recent.append(sample)
                    if frontier is not None:
                        frontier.done(sample.get("__id__"))
                batch.append(sample)
            if number == len(plan.batch_sizes) - 1 and s.limit is None:
                next(samples, None)  # let the readers finish so their end-of-shard counts are in
            yield self._collate(batch, worker, counts, frontier)

    def _collate(
        self, batch: List[dict], worker: int, counts: Dict[str, int], frontier: Optional[_Frontier] = None
    ) -> dict:
        image = self._image_batch([sample["image"] for sample in batch])
        result = {
            "image": image,
            "caption": [sample["caption"] for sample in batch],
            "key": [sample["key"] for sample in batch],
        }
        if self.format.image_embed_source:
            result["image_embed"] = torch.from_numpy(np.stack([sample["image_embed"] for sample in batch]))
        if self.format.text_embed_source:
            result["text_embed"] = torch.from_numpy(np.stack([sample["text_embed"] for sample in batch]))
        result[STATS_KEY] = {
            "worker": worker,
            "counts": dict(counts),
            "problems": dict(self.first_problems),
        }
        if frontier is not None:
            result[STATS_KEY]["frontier"] = frontier.report()
        return result

    def _image_batch(self, images: List[torch.Tensor]) -> torch.Tensor:
        """(B, C, H, W) from HWC uint8 images, each written in one pass straight into the batch.

        - In a worker process: uint8 (0..255), a quarter of the bytes of floats, in shared memory
          from the start, so the batch is not copied again on its way to the main process (the
          loader makes the floats there, unless the consumer asked for uint8).
        - In the main process: floats in [0, 1] (ToTensor's values), or uint8 with `uint8_images`.
        - With tensor transforms (which need floats): floats in [0, 1], transformed.
        """
        height, width, channels = images[0].shape
        shape = (len(images), channels, height, width)
        in_worker = get_worker_info() is not None
        as_uint8 = self.format.tensor_transform is None and (self.format.uint8_images or in_worker)
        out = torch.empty(shape, dtype=torch.uint8 if as_uint8 else torch.float32)
        if in_worker and as_uint8:
            # Shared before it is filled: sending a batch that is not in shared memory yet would
            # copy it there, written images and all.
            out.share_memory_()
        for row, image in zip(out.numpy(), images):
            chw = image.numpy().transpose(2, 0, 1)
            if as_uint8:
                np.copyto(row, chw)
            else:
                np.divide(chw, np.float32(255), out=row)  # ToTensor's float32 division, in one pass
        if self.format.tensor_transform is not None:
            out = torch.stack([self.format.tensor_transform(row) for row in out])
        return out

    # ----- reading shards -------------------------------------------------------------------

    def _load_embeddings(self, shard: planning.Shard) -> Dict[str, np.ndarray]:
        arrays = {}
        for name, source, url in (
            ("image_embed", self.format.image_embed_source, shard.img_embeddings_url),
            ("text_embed", self.format.text_embed_source, shard.text_embeddings_url),
        ):
            if source != "folder":
                continue
            try:
                arrays[name] = sources.load_npy(url)
            except Exception as error:  # the file, not the shard, is what is wrong: name it
                raise ValueError(f"{url}: {sources.npy_problem(error)}") from error
        return arrays

    def _read_piece(self, piece: planning.Piece, counts: Dict[str, int]) -> Iterator[dict]:
        """Samples `piece.start <= ordinal < piece.stop` of one shard, with embedding rows attached.

        Planned samples that cannot be delivered (unreadable shard or embeddings, archive broken
        off) are counted as seen and bad; with no stop (capped mode) only the shard is counted.
        """
        shard = piece.shard
        planned = None if piece.stop is None else piece.stop - piece.start
        delivered = 0

        def lose(reason: str, error: Exception) -> None:
            counts["shard_read_errors"] += 1
            if reason == "unreadable_embeddings":
                text = f"embedding file of shard {shard.url} unreadable: {error}"
            else:
                text = f"{reason.replace('_', ' ')}: {shard.url} ({error})"
            log.warning("%s", text)
            self.first_problems.setdefault(reason, f"{reason}: {text}")
            if planned is not None:
                counts["seen"] += planned - delivered
                counts[reason] += planned - delivered

        try:
            arrays = self._load_embeddings(shard)
        except Exception as error:
            lose("unreadable_embeddings", error)
            return
        try:
            stream = sources.open_stream(shard.url)
        except Exception as error:
            lose("unreadable_shard", error)
            return
        try:
            for ordinal, sample in enumerate(iter_tar_samples(stream)):
                if ordinal < piece.start:
                    continue
                if piece.stop is not None and ordinal >= piece.stop:
                    break
                delivered += 1
                sample["__shard__"] = shard.url
                sample["__id__"] = (shard.number, ordinal)
                if arrays:
                    self._attach_rows(sample, arrays)
                yield sample
        except ShardReadError as error:
            lose("not_a_tar" if getattr(error, "not_a_tar", False) else "truncated_tar", error)
            return
        finally:
            try:
                stream.close()
            except Exception:  # a pipe: command cut off early may report an error status; the data is read
                pass
        if planned is not None and delivered < planned:
            counted = (
                f"the {shard.size} samples recorded in {shard.size_source}"
                if shard.size_source
                else "counted when the run started"
            )
            lose("truncated_tar", ValueError(f"the shard has {piece.start + delivered} samples, fewer than {counted}"))

    def _attach_rows(self, sample: dict, arrays: Dict[str, np.ndarray]) -> None:
        key = sample["__key__"]
        digits = key[-self.format.index_width :]
        if len(key) < self.format.index_width or not digits.isdigit():
            sample["__bad__"] = "bad_key"
            sample["__detail__"] = f"the key does not end in data.index_width={self.format.index_width} digits"
            return
        index = int(digits)
        for name, array in arrays.items():
            if index >= len(array):
                sample["__bad__"] = "missing_embedding"
                sample["__detail__"] = f"index {index} but the {name.replace('_', ' ')} file has {len(array)} rows"
                return
            sample["__row_" + name] = np.array(array[index])

    def _raw_exact(
        self, plan: planning.WorkerPlan, counts: Dict[str, int], frontier: Optional[_Frontier] = None
    ) -> Iterator[dict]:
        for index, piece in enumerate(plan.pieces):
            for sample in self._read_piece(piece, counts):
                if frontier is not None:
                    frontier.read(index, sample["__id__"])
                yield sample

    def _raw_capped(self, plan: planning.WorkerPlan, counts: Dict[str, int], rng: random.Random) -> Iterator[dict]:
        shards = list(plan.shards)
        while True:
            if plan.resample:
                passes = [rng.choice(shards) for _ in range(len(shards))]
            else:
                passes = list(shards)
                if self.settings.shuffle_shards:
                    rng.shuffle(passes)
            delivered = 0
            for shard in passes:
                for sample in self._read_piece(planning.Piece(shard), counts):
                    delivered += 1
                    yield sample
            if delivered == 0:
                raise BadDataError(
                    f"data ({self.settings.phase}, rank {self.settings.rank}): none of "
                    f"{len(set(s.number for s in passes))} shard(s) delivered a sample"
                )

    # ----- decoding -------------------------------------------------------------------------

    def _decoded(
        self, raw: Iterator[dict], counts: Dict[str, int], where: str, frontier: Optional[_Frontier] = None
    ) -> Iterator[dict]:
        """Decoded good samples, all of one image size, with bad ones counted (and the first of each
        reason described).

        The size is the one the preprocessing gives every image when it fixes one; otherwise the
        most common size among the first `SIZE_VOTE` good images (so one odd image early on does
        not make every later one "odd").
        """
        expected = self.format.image_shape
        undecided: List[dict] = []  # good samples held back until the expected size is known
        consecutive_bad = 0

        def bad(sample: dict, reason: str, detail: Optional[str]) -> None:
            nonlocal consecutive_bad
            counts[reason] += 1
            if frontier is not None:
                frontier.done(sample.get("__id__"))
            self._note_bad(reason, sample, detail, where)
            consecutive_bad += 1
            check_bad_fraction(
                counts, self.settings.max_bad_fraction, where, final=False, first_problems=self.first_problems
            )
            if consecutive_bad >= MAX_CONSECUTIVE_BAD:
                raise BadDataError(f"{where}: {consecutive_bad} bad samples in a row; {self._first_problem_text()}")

        def judged(decoded: dict, sample: dict) -> bool:
            """Count a decoded sample as ok, or as a size mismatch."""
            nonlocal consecutive_bad
            shape = tuple(decoded["image"].shape[:2])
            if shape != expected:
                bad(
                    sample,
                    "image_size_mismatch",
                    f"after preprocessing the image is {shape[0]}x{shape[1]} "
                    f"(height x width); the batch needs {expected[0]}x{expected[1]}",
                )
                return False
            consecutive_bad = 0
            counts["ok"] += 1
            return True

        def decide() -> Iterator[dict]:
            nonlocal expected
            votes = collections.Counter(tuple(decoded["image"].shape[:2]) for decoded, _ in undecided)
            expected = max(
                votes,
                key=lambda shape: (
                    votes[shape],
                    -next(i for i, (d, _) in enumerate(undecided) if tuple(d["image"].shape[:2]) == shape),
                ),
            )
            for decoded, sample in undecided:
                if judged(decoded, sample):
                    yield decoded
            undecided.clear()

        for sample in raw:
            counts["seen"] += 1
            decoded, reason, detail = decode_sample(sample, self.format)
            if decoded is None:
                bad(sample, reason, detail)
                continue
            if expected is None:
                held = {
                    "__key__": sample.get("__key__"),
                    "__shard__": sample.get("__shard__"),
                    "__id__": sample.get("__id__"),
                }
                undecided.append((decoded, held))
                if len(undecided) >= SIZE_VOTE:
                    yield from decide()
                continue
            if judged(decoded, sample):
                yield decoded
        if undecided:
            yield from decide()

    def _note_bad(self, reason: str, sample: dict, detail: Optional[str], where: str) -> None:
        """Keep (and log once) the first example of each reason, so errors can say what was wrong."""
        if reason in self.first_problems:
            return
        text = f"{reason}: sample {sample.get('__key__', '?')!r}"
        if sample.get("__shard__"):
            text += f" of {sample['__shard__']}"
        if detail:
            text += f": {detail}"
        self.first_problems[reason] = text
        log.warning("%s: bad sample (further ones of this kind are only counted): %s", where, text)

    def _first_problem_text(self) -> str:
        return "first problems: " + "; ".join(self.first_problems.values()) if self.first_problems else ""
