"""What the loop's save phase computes besides the trainer's state: the fields save paths are named
with, where each rank's data stood, a sharded run's shards, and the end-of-run check that every
process holds the same replicated weights."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn

from ..config.tracker import TrackerConfig
from ..tracking.protocol import TrackerProtocol
from ..tracking.sharded import ShardedCheckpoint, write_shards
from ..tracking.tracker import saves_wanted
from . import sharding
from .state import Phase, Progress
from .trainer import DecoderTrainer


def save_fields(progress: Progress, batch_samples: int) -> Dict[str, Any]:
    """The fields of `{epoch}`-style save paths, with DALLE2-pytorch's names and meanings."""
    if progress.phase is Phase.TRAIN and progress.batches_in_epoch == 0 and progress.epoch > 0:
        # The end-of-epoch save (the epoch counter has moved on): named after the epoch it ends.
        fields = {"epoch": progress.epoch - 1, "sample": 0, "next_task": "sample"}
    else:
        fields = {
            "epoch": progress.epoch,
            "sample": progress.batches_in_epoch * batch_samples,
            # DALLE2-pytorch's names: "val" for an epoch whose end-of-epoch phases are still to do
            "next_task": "train" if progress.phase is Phase.TRAIN else "val",
        }
    fields.update(validation_losses=list(progress.validation_losses), samples_seen=progress.samples_seen)
    return fields


def gather_ranks(accelerator: Accelerator, rng: Dict[str, Any], position: Any) -> Tuple[List[Any], List[Any]]:
    """Every rank's random state and loader position, in rank order (a collective)."""
    gathered = gather_object([(rng, position)]) if accelerator.num_processes > 1 else [(rng, position)]
    return [entry[0] for entry in gathered], [entry[1] for entry in gathered]


def data_position(progress: Progress, processes: int, workers: int, frontiers: List[Any]) -> Dict[str, Any]:
    """`Progress.data_position` from every rank's loader position (empty outside an epoch's training)."""
    if progress.mid_epoch and all(f is not None for f in frontiers):
        return {"world_size": processes, "workers": workers, "frontiers": frontiers}
    return {}


def sharded_save(
    trainer: DecoderTrainer,
    tracker: TrackerProtocol,
    config: TrackerConfig,
    step: int,
    *,
    checkpoint_state: Callable[[], Dict[str, Any]],
    is_best: bool,
) -> Tuple[Optional[ShardedCheckpoint], Optional[Dict[str, torch.Tensor]]]:
    """What every process of a sharded run does for a save before the tracker places it: write its
    shards into a staging folder the main process names, and gather the weights of a `model` save.
    Every process decides alike from the config (no process skips a collective another joins)."""
    accelerator, sharded_checkpoint = trainer.accelerator, None
    if saves_wanted(config, "checkpoint", is_best):
        staging = [tracker.staging_folder(step)]
        if accelerator.num_processes > 1:
            broadcast_object_list(staging)
        folder = staging[0] / "checkpoint"
        write_shards(folder, trainer.sharded_state())
        sharded_checkpoint = ShardedCheckpoint(folder=folder, staging=staging[0], state=checkpoint_state)
    weights = trainer.model_state_dict() if saves_wanted(config, "model", is_best) else None
    return sharded_checkpoint, weights


def replicas_agree(accelerator: Accelerator, decoder: nn.Module) -> Optional[bool]:
    """Whether every process holds the same replicated weights (a cheap fingerprint comparison; a
    collective). None when there is nothing to compare: one process, or every parameter sharded
    (sharded U-Nets differ by design, each process holding its own shards)."""
    if accelerator.num_processes == 1:
        return None
    replicated = [p for p in decoder.parameters() if p is sharding.local(p)]
    if not replicated:
        return None
    fingerprint = torch.stack([p.detach().double().sum() for p in replicated]).to(accelerator.device)
    gathered = accelerator.gather(fingerprint[None]).cpu()
    return all(torch.equal(gathered[0], row) for row in gathered[1:])
