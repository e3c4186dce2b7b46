"""Where a resumed run starts: its progress from a checkpoint of either writer, corrected for the
config changes the resume applies, and its place inside the epoch it stopped in (with the same or
other ranks and workers)."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence, Tuple

from .resume import Change, reference_progress
from .state import Progress, TrainingState


def saved_progress(
    state: TrainingState, config_json: Optional[str], *, batch_samples: int, save_every: int
) -> Tuple[Progress, Optional[Dict[str, Any]]]:
    """The progress a checkpoint resumes from and the config it was saved with (as a dict, None
    when not recorded); a DALLE2-pytorch checkpoint's in its own terms (`resume.reference_progress`)."""
    reference = state.reference
    if reference is not None:
        progress = reference_progress(reference, batch_samples=batch_samples, save_every=save_every)
        return Progress.from_dict(progress), reference.get("config")
    return state.progress, json.loads(config_json) if config_json else None


def follow_changes(progress: Progress, changes: Sequence[Change], save_every: int) -> None:
    """Correct a resumed progress for the config changes: a new save interval counts from here, and
    a refused change drops the in-epoch position (said in the change's line)."""
    if any(c.path == "train.save_every_n_samples" for c in changes):
        progress.next_save_at = progress.samples_seen + save_every
    if any(not c.applied for c in changes):
        progress.batches_in_epoch = 0
        progress.loss_window = {}


def place_in_epoch(progress: Progress, loader: Any, processes: int, saved_ranks: Optional[int]) -> Optional[str]:
    """Set `loader` (this rank's training loader) and `progress` to go on inside `progress.epoch`;
    returns the line that says how, when the ranks or workers changed (None otherwise).

    With the ranks and workers that saved it: the same batches, read past (see the loop's train
    phase). With others, in an exact epoch: the samples every old worker had not yet put in a batch
    are shared among the ranks now (`data.plan.RestOfEpoch`), so each is read once; in a capped
    epoch (which cycles through its shards, repeats included) the new ranks skip as many of their
    batches as make the samples already seen.
    """
    position = progress.data_position or {}
    saved_world = int(position.get("world_size", saved_ranks or processes))
    workers = max(1, loader.num_workers)
    saved_workers = int(position.get("workers", workers))
    if (saved_world, saved_workers) == (processes, workers):
        loader.continue_epoch(progress.epoch, loader.rest_from(progress.epoch, progress.rest_of_epoch))
        return None
    before = f"{saved_world} process(es) x {saved_workers} worker(s)"
    now = f"{processes} x {workers}"
    if position.get("frontiers"):
        rest = loader.leftover(
            progress.epoch,
            world_size=saved_world,
            workers=saved_workers,
            frontiers=position["frontiers"],
            rest=progress.rest_of_epoch,
        )
        loader.continue_epoch(progress.epoch, rest)
        progress.rest_of_epoch = rest.to_list()
        progress.batches_in_epoch = 0
        share, extra = divmod(rest.total, processes)
        dropped = f"; {rest.total} samples is fewer than one per process: they are dropped" if not share else ""
        return (
            f"resumed with {now} instead of {before}: the {rest.total} samples of epoch {progress.epoch + 1} not "
            f"yet trained on are shared out, {share}{' or ' + str(share + 1) if extra else ''} per process, "
            f"{len(loader)} batches each{dropped}"
        )
    done = progress.batches_in_epoch * saved_world
    progress.batches_in_epoch = done // processes
    return (
        f"resumed with {now} instead of {before} in a capped epoch (train.epoch_samples): the new processes skip "
        f"{progress.batches_in_epoch} of their batches, the samples already seen; capped epochs cycle "
        "through their shards, so which samples the rest of the epoch reads is not kept"
    )
