"""`create_dataloaders`: the train, val and test loaders of one rank, from the `data` config."""

from __future__ import annotations

import hashlib
import io
import logging
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..common.signals import leave_stop_signals_to_parent, stop_signals_blocked
from . import plan as planning
from . import sources
from .dataset import STATS_KEY, PhaseSettings, ShardDataset
from .decode import IMAGE_EMBED_MEMBERS, TEXT_EMBED_MEMBERS, SampleFormat
from .stats import check_bad_fraction, format_counts, merge_counts, new_counts
from .tar_reader import ShardReadError, iter_tar_samples
from .transforms import split_transform

log = logging.getLogger(__name__)

PHASES = ("train", "val", "test")


class ShardLoader:
    """Batches of one phase for one rank; iterate it once per epoch.

    - `len(loader)`: batches per epoch, the same on every rank.
    - `loader.set_epoch(epoch)`: choose the epoch's shard order and shuffle (call before iterating).
    - `loader.stats`: the counts of the latest (or current) pass: `seen`, `ok`, each bad reason,
      `padded`, `dropped_for_balance`, `shard_read_errors` (summed over this rank's workers).
    - `loader.position(batches)` (exact epochs): how far each worker had got when the first
      `batches` batches of this pass were made, for a checkpoint; `loader.continue_epoch(epoch,
      rest)`: that epoch reads the samples an interrupted run left (`planning.RestOfEpoch`).
    """

    def __init__(
        self,
        dataset: ShardDataset,
        *,
        num_workers: int,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        dropped_for_balance: int = 0,
    ):
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.dropped_for_balance = dropped_for_balance
        self._length = len(dataset)
        self.stats: Dict[str, int] = new_counts()
        self._frontiers: Dict[int, list] = {}
        """Per worker, the (batch index, frontier) of its latest two batches delivered in this pass."""

    @property
    def phase(self) -> str:
        return self.dataset.settings.phase

    @property
    def batch_size(self) -> int:
        return self.dataset.settings.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch
        self._length = len(self.dataset)

    def continue_epoch(self, epoch: int, rest: Optional[planning.RestOfEpoch]) -> None:
        """Epoch `epoch` reads `rest` (what an interrupted run with other ranks or workers left of it);
        None: its own plan."""
        self.dataset.rest = (epoch, rest) if rest is not None else None
        self._length = len(self.dataset)

    def rest_of_epoch(self) -> Optional[planning.RestOfEpoch]:
        return self.dataset.rest_of_epoch()

    def rest_from(self, epoch: int, rest: Optional[list] = None) -> Optional[planning.RestOfEpoch]:
        """A saved rest of epoch (`RestOfEpoch.to_list()`) over this split's shards, or None."""
        return planning.RestOfEpoch.from_list(rest, self.dataset.shards) if rest is not None else None

    def leftover(
        self, epoch: int, *, world_size: int, workers: int, frontiers: list, rest: Optional[list] = None
    ) -> planning.RestOfEpoch:
        """What a run of `world_size` ranks with `workers` workers each left of exact epoch `epoch`
        (its own plan, or the saved `rest` it was reading) when its workers were at `frontiers`."""
        s = self.dataset.settings
        previous = self.rest_from(epoch, rest)
        order = planning.epoch_order(self.dataset.shards, shuffle=s.shuffle_shards, seed=s.seed, epoch=epoch)
        plans = []
        for rank in range(world_size):
            options = dict(rank=rank, world_size=world_size, workers=workers, batch_size=s.batch_size)
            if previous is not None:
                plans.append([previous.worker_plan(worker=w, **options) for w in range(workers)])
            else:
                plans.append([planning.exact_worker_plan(order, worker=w, **options) for w in range(workers)])
        reached = [
            [planning.Frontier.from_dict(f) if f is not None else None for f in rank_frontiers]
            for rank_frontiers in frontiers
        ]
        return planning.rest_of_epoch(plans, reached)

    def global_batch_samples(self) -> List[int]:
        """Samples of each batch of the epoch summed over all ranks (see `ShardDataset.global_batch_samples`)."""
        return self.dataset.global_batch_samples()

    def position(self, batches: int) -> Optional[List[Optional[dict]]]:
        """Each worker's frontier (`planning.Frontier.to_dict()`, None before its first batch) after the
        first `batches` batches of the current pass; None in capped epochs (which cycle through their shards)."""
        if self.dataset.settings.limit is not None:
            return None
        found: List[Optional[dict]] = []
        for worker in range(max(1, self.num_workers)):
            entries = [frontier for index, frontier in self._frontiers.get(worker, []) if index < batches]
            found.append(entries[-1] if entries else None)
        return found

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[dict]:
        settings = self.dataset.settings
        where = f"data ({settings.phase}, rank {settings.rank}, epoch {self.dataset.epoch})"
        per_worker: Dict[int, Dict[str, int]] = {}
        problems: Dict[str, str] = {}
        extras = {"dropped_for_balance": self.dropped_for_balance}
        self.stats = merge_counts([extras])
        self._frontiers = {}
        if self._length == 0:
            return
        sample_format = self.dataset.format
        # Workers send uint8 images (see ShardDataset._image_batch); floats, when asked for, are
        # made here, straight into page-locked memory with pin_memory.
        to_float = self.num_workers > 0 and sample_format.tensor_transform is None and not sample_format.uint8_images
        loader = DataLoader(
            self.dataset,
            batch_size=None,  # the dataset yields whole batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and not to_float,  # converted batches are pinned below
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=False,  # workers start per epoch with the epoch set in the dataset
            # The workers' torch seeds come from this generator, not the global one: random
            # augmentations then depend only on (seed, phase, rank, epoch), so a resumed run that
            # reads its way back to the same batch sees the same augmented images.
            generator=torch.Generator().manual_seed(
                _epoch_seed(settings.seed, settings.phase, settings.rank, self.dataset.epoch)
            ),
            # A stop signal sent to the whole process group is the main process's to handle: workers
            # ignore it, so it cannot kill them first (see common/signals.py).
            worker_init_fn=leave_stop_signals_to_parent if self.num_workers > 0 else None,
        )
        with stop_signals_blocked():  # the workers start here, and ignore the signals before unblocking
            batches = iter(loader)
        for index, batch in enumerate(batches):
            report = batch.pop(STATS_KEY)
            if "frontier" in report:
                kept = self._frontiers.setdefault(int(report["worker"]), [])
                kept[:] = kept[-1:] + [(index, report["frontier"])]
            if to_float:
                batch["image"] = unit_float_batch(batch["image"], pin_memory=self.pin_memory)
                if self.pin_memory:
                    batch.update(
                        {k: v.pin_memory() for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "image"}
                    )
            per_worker[int(report["worker"])] = report["counts"]
            for reason, text in report.get("problems", {}).items():
                problems.setdefault(reason, text)
            self.stats = merge_counts([extras, *per_worker.values()])
            check_bad_fraction(self.stats, settings.max_bad_fraction, where, final=False, first_problems=problems)
            yield batch
        check_bad_fraction(self.stats, settings.max_bad_fraction, where, final=True, first_problems=problems)
        level = logging.WARNING if any(self.stats[k] for k in self.stats if k not in ("seen", "ok")) else logging.INFO
        log.log(level, "%s: %s", where, format_counts(self.stats))


def unit_float_batch(images: torch.Tensor, *, pin_memory: bool = False) -> torch.Tensor:
    """uint8 images (0..255) as float32 in [0, 1], bit for bit what ToTensor computes (a float32
    division by 255), in one vectorised pass into a new (page-locked with `pin_memory`) batch."""
    out = torch.empty(images.shape, dtype=torch.float32, pin_memory=pin_memory)
    np.divide(images.contiguous().numpy(), np.float32(255), out=out.numpy())
    return out


def _epoch_seed(seed: int, phase: str, rank: int, epoch: int) -> int:
    """A 63-bit seed that differs for every (seed, phase, rank, epoch)."""
    digest = hashlib.sha256(f"{seed}-{phase}-{rank}-{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _infer_sample_format(
    data_config, shards: List[planning.Shard], transform, image_embed_dim, text_embed_dim, uint8_images: bool = False
):
    in_shards = data_config.embeddings_in_shards
    if in_shards is None:
        in_shards = data_config.img_embeddings_url is None
    if not in_shards and data_config.img_embeddings_url is None:
        raise planning.DataSetupError("data.embeddings_in_shards is false but data.img_embeddings_url is not set")
    image_source = "folder" if data_config.img_embeddings_url and not in_shards else None
    text_source = "folder" if data_config.text_embeddings_url and not in_shards else None
    if in_shards:
        # Look at the first sample that has members besides the image to see what the shards hold.
        members = first_sample_members(shards)
        if any(m in members for m in IMAGE_EMBED_MEMBERS):
            image_source = "shard"
            if image_embed_dim is None:
                image_embed_dim = _member_dim(members, IMAGE_EMBED_MEMBERS)
        elif data_config.embeddings_in_shards:
            raise planning.DataSetupError(
                f"data.embeddings_in_shards is true but the first sample of {shards[0].url} has no "
                f"{' / '.join(IMAGE_EMBED_MEMBERS)} member"
            )
        else:
            log.info("no embeddings in the shards: batches carry images and captions only")
        if any(m in members for m in TEXT_EMBED_MEMBERS):
            text_source = "shard"
            if text_embed_dim is None:
                text_embed_dim = _member_dim(members, TEXT_EMBED_MEMBERS)
    if image_source == "folder" and image_embed_dim is None:
        image_embed_dim = sources.npy_shape(shards[0].img_embeddings_url)[-1]
    if text_source == "folder" and text_embed_dim is None:
        text_embed_dim = sources.npy_shape(shards[0].text_embeddings_url)[-1]
    return SampleFormat(
        pil_transform=transform[0],
        tensor_transform=transform[1],
        index_width=data_config.index_width,
        image_shape=fixed_image_shape(transform[0]),
        image_embed_source=image_source,
        text_embed_source=text_source,
        image_embed_dim=image_embed_dim,
        text_embed_dim=text_embed_dim,
        uint8_images=uint8_images,
    )


def fixed_image_shape(pil_transform) -> Optional[tuple]:
    """(height, width) the PIL steps give every image, or None when the output size follows the input.

    Found by running the steps on gray images of different sizes and shapes (a Resize with a
    CenterCrop, or a RandomResizedCrop, give all the same size; a Resize alone keeps the aspect
    ratio, a flip the size: then each image has its own).
    """
    from PIL import Image

    if pil_transform is None:
        return None
    shapes = set()
    for size in ((509, 509), (1031, 1031), (800, 300), (300, 800)):
        try:
            out = pil_transform(Image.new("RGB", size, (128, 128, 128)))
        except Exception:
            return None
        if not isinstance(out, Image.Image):
            return None
        shapes.add((out.size[1], out.size[0]))
    return shapes.pop() if len(shapes) == 1 else None


def first_sample_members(shards: List[planning.Shard]) -> dict:
    """The members (name -> bytes) of the first sample of the first readable one of `shards`' first
    three, or {} when none can be read: what the samples hold, known before any loader starts."""
    for shard in shards[:3]:
        try:
            with sources.open_stream(shard.url) as stream:
                for sample in iter_tar_samples(stream):
                    return sample
        except (OSError, ShardReadError, ValueError) as error:
            log.warning("cannot read %s to see what its samples hold: %s", shard.url, error)
    return {}


def _member_dim(members: dict, names) -> Optional[int]:
    data = next(members[m] for m in names if m in members)
    try:
        return int(np.load(io.BytesIO(data), allow_pickle=False).shape[-1])
    except Exception:
        return None


def create_dataloaders(
    data_config,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    epoch_samples: Optional[int] = None,
    validation_samples: Optional[int] = None,
    test_samples: Optional[int] = None,
    image_embed_dim: Optional[int] = None,
    text_embed_dim: Optional[int] = None,
    pin_memory: bool = False,
    uint8_images: bool = False,
) -> Dict[str, ShardLoader]:
    """The `{"train", "val", "test"}` loaders of this rank (see docs/DATA.md).

    `seed` must be the same on every rank (it splits the shards and orders them each epoch).
    `epoch_samples` / `validation_samples` / `test_samples` cap a phase at that many samples per
    epoch across all ranks; None reads the split exactly once. `image_embed_dim` /
    `text_embed_dim`: the dimension the model expects (embeddings of another size are bad data);
    None infers it from the data. `uint8_images`: batch images as uint8 0..255 (the consumer scales
    them on its device; the training loop does), unless the preprocessing has tensor transforms.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if data_config.batch_size < 1:
        raise ValueError("data.batch_size must be at least 1")
    if data_config.resample_train and epoch_samples is None:
        raise planning.DataSetupError("data.resample_train needs train.epoch_samples: resampled epochs have no end")
    transform = split_transform(data_config.preprocessing)
    shards = planning.configured_shards(data_config)
    splits = data_config.splits
    by_phase = planning.split_shards(shards, {"train": splits.train, "val": splits.val, "test": splits.test}, seed)
    sample_format = _infer_sample_format(data_config, shards, transform, image_embed_dim, text_embed_dim, uint8_images)
    limits = {"train": epoch_samples, "val": validation_samples, "test": test_samples}
    loaders = {}
    for phase in PHASES:
        loaders[phase] = _phase_loader(
            data_config,
            phase,
            by_phase[phase],
            sample_format,
            seed=seed,
            rank=rank,
            world_size=world_size,
            limit=limits[phase] if by_phase[phase] else None,
            pin_memory=pin_memory,
        )
    return loaders


LIMIT_NAMES = {"train": "epoch_samples", "val": "validation_samples", "test": "test_samples"}
"""The option that caps each phase, named in messages."""


def _phase_loader(
    data_config,
    phase: str,
    phase_shards: List[planning.Shard],
    sample_format: SampleFormat,
    *,
    seed: int,
    rank: int,
    world_size: int,
    limit: Optional[int],
    pin_memory: bool,
) -> ShardLoader:
    """The loader of one phase for this rank: `limit` samples per epoch, or the split exactly once (None)."""
    training = phase == "train"
    resample = training and data_config.resample_train
    dropped = 0
    if limit is None:
        phase_shards = planning.count_samples(phase_shards, data_config.webdataset_base_url)
        total = sum(shard.size for shard in phase_shards)
        dropped = total - world_size * planning.exact_rank_samples(total, world_size)
    settings = PhaseSettings(
        phase=phase,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=data_config.num_workers,
        batch_size=data_config.batch_size,
        shuffle_shards=training and (data_config.shuffle_train or resample),
        shuffle_buffer=data_config.shuffle_buffer if training and data_config.shuffle_train else 0,
        limit=limit,
        resample=resample,
        max_bad_fraction=data_config.max_bad_sample_fraction,
        limit_name=LIMIT_NAMES[phase],
    )
    loader = ShardLoader(
        ShardDataset(phase_shards, settings, sample_format),
        num_workers=data_config.num_workers,
        pin_memory=pin_memory,
        dropped_for_balance=dropped if rank == 0 else 0,
    )
    log.info("data (%s): %d shard(s), %d batch(es) per epoch on each rank", phase, len(phase_shards), len(loader))
    return loader
