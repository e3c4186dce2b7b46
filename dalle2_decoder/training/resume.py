"""Continuing a run from its checkpoint when the config changed: every change applied or refused, and said.

`tracker.load` and auto-resume continue the run a checkpoint came from (progress, optimizers,
schedulers, EMA), as DALLE2-pytorch does. The config given now may differ from the one the
checkpoint was saved with; `describe_changes` lists each changed option with what happens to it,
one line each. What the loop cannot honour (e.g. the position inside an epoch after the batch size
changed) is refused with its reason; a decoder whose weights no longer fit is refused by the load
itself (CheckpointMismatchError names every tensor).
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import attrs

MISSING = object()


@attrs.frozen
class Change:
    path: str
    old: Any
    new: Any
    applied: bool
    how: str

    def line(self) -> str:
        verdict = "applied" if self.applied else "refused"
        return f"config change on resume: {self.path}: {_show(self.old)} -> {_show(self.new)}: {verdict} ({self.how})"


def _show(value: Any) -> str:
    if value is MISSING:
        return "(not set)"
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _leaves(value: Any, path: str = "") -> Iterator[Tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}" if path else str(key))
    else:
        yield path, value


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any], sections: Optional[List[str]] = None):
    """Changed leaves (lists compared whole), as (path, old, new)."""
    old, new = dict(_leaves(saved)), dict(_leaves(current))
    for path in sorted(set(old) | set(new)):
        if sections is not None and not any(path == s or path.startswith(s + ".") for s in sections):
            continue
        before, after = old.get(path, MISSING), new.get(path, MISSING)
        if before != after and not (_number(before) and _number(after) and float(before) == float(after)):
            yield path, before, after


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Options a DALLE2-pytorch checkpoint's config can be compared on (its other sections have other
# names and defaults, so they are not compared).
REFERENCE_COMPARED = ["seed", "train", "data.batch_size"]


def describe_changes(
    saved_config: Optional[Mapping[str, Any]],
    current_config: Mapping[str, Any],
    *,
    epoch: int,
    mid_epoch: bool,
    reference: bool = False,
) -> List[Change]:
    """What happens to each option that differs between the checkpoint's config and the current one.

    `epoch`: the 0-based epoch the checkpoint continues in; `mid_epoch`: it stopped inside that
    epoch's training. `reference`: the saved config is a DALLE2-pytorch one (compared on the
    options the two share).
    """
    if saved_config is None:
        return []
    changes = []
    sections = REFERENCE_COMPARED if reference else None
    for path, old, new in _differences(saved_config, current_config, sections):
        if reference and (old is MISSING or new is MISSING):
            continue  # an option only one of the packages has
        if path == "tracker.load" or path.startswith("tracker.load."):
            continue  # naming the checkpoint is how the run got here, not a change to report
        changes.append(_judge(path, old, new, epoch=epoch, mid_epoch=mid_epoch))
    return changes


# Data options that change neither which samples an epoch's batches hold nor their order; any other
# data option (the shards, embeddings, batch size, workers that interleave the batches, shuffle)
# and the seed make the position inside an epoch meaningless.
SAME_BATCHES = ("data.preprocessing", "data.max_bad_sample_fraction")


def _position_refused(path: str, old: Any, new: Any, epoch: int) -> Change:
    return Change(
        path,
        old,
        new,
        False,
        f"the position inside epoch {epoch + 1} cannot be kept with other data or batches; "
        "that epoch's training restarts from its first batch; samples seen so far are kept",
    )


def _judge(path: str, old: Any, new: Any, *, epoch: int, mid_epoch: bool) -> Change:
    def applied(how: str) -> Change:
        return Change(path, old, new, True, how)

    if path == "train.epochs":
        if isinstance(new, int) and new <= epoch:
            return applied(f"the checkpoint already finished {epoch} epoch(s); nothing is left to train")
        return applied(f"the run continues in epoch {epoch + 1} and ends after epoch {new}")
    if path in ("train.lr", "train.wd"):
        return applied("set on the restored optimizers from now on; their moments are kept")
    if path == "train.warmup_steps":
        return applied("the warm-up continues from the optimizer steps already taken")
    if path in ("train.lr_schedule", "train.lr_min_ratio", "train.lr_decay_steps"):
        return applied("the schedule continues from the optimizer steps already taken")
    if path.startswith("train.posthoc_ema"):
        return applied("profiles kept before and now continue; new ones start at the next update")
    if path == "train.unet_training_mask":
        return applied("U-Nets trained now and not before start with fresh optimizers; see the notes below")
    if path.startswith("train.ema") or path == "train.use_ema":
        return applied("used by the EMA from the next update; its saved average and count are kept")
    if path == "seed" or path.startswith("data."):
        if mid_epoch and not path.startswith(SAME_BATCHES):
            return _position_refused(path, old, new, epoch)
        return applied("from the next batch drawn; the saved random-number states are not restored")
    if path.startswith("decoder."):
        return applied("the saved weights fit the changed decoder")
    if path.startswith(("tracker.", "evaluate.", "train.")):
        return applied("takes effect from now on")
    return applied("takes effect from now on")


def position_is_kept(changes: List[Change]) -> bool:
    """False when a change moved the data (the in-epoch position and RNG states are then not restored)."""
    return not any(c.path == "seed" or c.path.startswith("data.") for c in changes)


def reference_progress(info: Mapping[str, Any], *, batch_samples: int, save_every: int) -> Dict[str, Any]:
    """Our `Progress` fields from what a DALLE2-pytorch checkpoint records (epoch, sample, next_task ...).

    Its `sample` counts the samples of the epoch in progress (over all ranks); `next_task` says
    which phase was next: `train` continues that epoch after `sample` samples, `val` validates
    next, `sample` means the epoch's end-of-epoch save was this one, so the next epoch is next.
    """
    epoch, task = int(info.get("epoch", 0)), str(info.get("next_task", "train"))
    samples_seen = int(info.get("samples_seen", 0))
    losses = [float(v) for v in info.get("validation_losses", []) or []]
    trained = max(1, int(info.get("num_trained_unets", 1)))
    # The reference's validation loss is the mean over trained U-Nets; ours is their sum.
    best = min(losses) * trained if losses else math.inf
    progress = {
        "epoch": epoch,
        "batches_in_epoch": 0,
        "phase": "train",
        "samples_seen": samples_seen,
        "next_save_at": samples_seen + save_every,
        "best_val_loss": best,
    }
    if task == "train":
        progress["batches_in_epoch"] = int(info.get("sample", 0)) // max(1, batch_samples)
    elif task == "val":
        progress["phase"] = "validate"
    else:
        progress["epoch"] = epoch + 1
    return progress
