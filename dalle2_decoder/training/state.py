"""What a training checkpoint holds, in one place for save, resume, evaluation and `load_decoder`.

A checkpoint's `state` (see `tracking.checkpoint`) is the dict `checkpoint_payload` builds:

- `trainer`: `DecoderTrainer.state_dict()`: decoder weights, optimizers, schedulers, EMAs, counters;
- `progress`: `Progress.to_dict()`, where the run is;
- `rng`: the random-number states of every rank, in rank order;
- `config_digest`: identifies the config the run was saved with;
- `package_version`: the dalle2_decoder version that wrote it.

A DALLE2-pytorch checkpoint, converted while reading, holds `trainer` and `reference` (its own
progress and config) instead. `TrainingState.from_checkpoint` checks either kind and names the
file in one line when an entry is missing or malformed; `checkpoint_weights` gives the weights to
sample with (EMA or trained).
"""

from __future__ import annotations

import enum
import hashlib
import math
from typing import Any, Dict, List, Mapping, Optional

import attrs

from .._version import __version__
from ..config.root import TrainDecoderConfig
from ..tracking.checkpoint import CheckpointFormatError, LoadedCheckpoint
from ..tracking.checkpoint import checkpoint_weights as checkpoint_weights  # the rule lives with the file format
from ..tracking.checkpoint import has_ema_weights as has_ema_weights
from ..tracking.checkpoint import trainer_state as _trainer_state


class Phase(str, enum.Enum):
    """Phase of an epoch still to run; the values are what checkpoints store.

    A checkpoint saved on a stop records the phase the stop cut short, which a resumed run runs
    again from its start; the phases before it are done, the ones after it still to do.
    """

    TRAIN = "train"
    """The epoch's training (from `batches_in_epoch`)."""
    VALIDATE = "validate"
    """Training of the epoch is done; validate, evaluate, sample and save are still to do."""
    EVALUATE = "evaluate"
    """Validated (`val_loss` holds the result); evaluate, sample and save are still to do."""
    SAMPLE = "sample"
    """Validated and evaluated; the end-of-epoch sample grids and the save are still to do."""

    @property
    def label(self) -> str:
        """The phase as a log line names it."""
        return _LABELS[self]


_LABELS = {
    Phase.TRAIN: "training",
    Phase.VALIDATE: "validation",
    Phase.EVALUATE: "evaluation",
    Phase.SAMPLE: "sample grids",
}

_LEGACY_PHASES = {"end": Phase.VALIDATE}
"""Values of checkpoints from before the end-of-epoch phases were told apart ("end": all still to do)."""


def _phase(value: Any) -> Phase:
    if isinstance(value, Phase):
        return value
    return _LEGACY_PHASES.get(value) or Phase(value)


@attrs.define
class Progress:
    """Where the run is; saved in every checkpoint and restored on resume."""

    epoch: int = 0
    """Epoch in progress (0-based)."""
    batches_in_epoch: int = 0
    """Training batches of `epoch` already consumed on each rank."""
    phase: Phase = attrs.field(default=Phase.TRAIN, converter=_phase)
    """Phase of `epoch` to run next."""
    samples_seen: int = 0
    """Training samples consumed so far, summed over ranks."""
    next_save_at: int = 0
    """`samples_seen` at which the next periodic sample grid and checkpoint are due."""
    best_val_loss: float = math.inf
    """Lowest mean validation loss so far (sum over trained U-Nets)."""
    validation_losses: List[float] = attrs.Factory(list)
    """Every epoch's validation loss so far (for the `{validation_losses}` field of save paths)."""
    val_loss: Optional[float] = None
    """This epoch's validation loss once validated, until the epoch's save compares it with the best."""
    periodic_due: bool = False
    """A periodic sample grid and checkpoint were due here when the run stopped: they run before
    training goes on."""
    sampled_at: Optional[int] = None
    """`samples_seen` of the last sample grids logged (an epoch's end does not draw them twice)."""
    loss_window: Dict[str, Any] = attrs.Factory(dict)
    """The training losses summed since the last logged mean (`sums` per U-Net, `steps`, `samples`),
    so that logged means cover the same steps whether or not the run was resumed in between."""
    data_position: Dict[str, Any] = attrs.Factory(dict)
    """Inside an exact epoch's training: how far each worker of each rank had read (`world_size`,
    `workers`, `frontiers[rank][worker]`), so that a run resumed with other ranks or workers
    reads the rest of the epoch once (`data.plan.RestOfEpoch`). Empty otherwise."""
    rest_of_epoch: Optional[List[List[int]]] = None
    """When `epoch` reads what an interrupted run with other ranks or workers left of it: those
    samples (`RestOfEpoch.to_list()`), which `batches_in_epoch` counts batches of."""

    @property
    def mid_epoch(self) -> bool:
        """Stopped inside an epoch's training (not at its start, not after it)."""
        return self.phase is Phase.TRAIN and self.batches_in_epoch > 0

    def position(self) -> tuple:
        """What a checkpoint of this progress would resume from (two equal positions: nothing new to save)."""
        return (self.epoch, self.batches_in_epoch, self.phase, self.periodic_due)

    def to_dict(self) -> Dict[str, Any]:
        """Plain values only (the phase as its string), so the checkpoint loads weights-only."""
        values = attrs.asdict(self)
        values["phase"] = self.phase.value
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Progress":
        """From `to_dict()` (fields a checkpoint lacks keep their defaults); ValueError for a value that cannot be."""
        return cls(**{field.name: values[field.name] for field in attrs.fields(cls) if field.name in values})


def config_digest(config: TrainDecoderConfig) -> str:
    """Identifies the config a checkpoint was saved with: one saved by the same config continues the run.

    A digest rather than the JSON itself, because the tracker masks secrets in checkpoint strings.
    """
    return hashlib.sha256(config.to_json(indent=None).encode()).hexdigest()


def checkpoint_payload(
    trainer_state: Dict[str, Any],
    progress: Progress,
    rng: List[Dict[str, Any]],
    config: TrainDecoderConfig,
) -> Dict[str, Any]:
    """The `state` of a checkpoint: what `TrainingState.from_checkpoint` reads back."""
    return {
        "trainer": trainer_state,
        "progress": progress.to_dict(),
        "rng": rng,
        "config_digest": config_digest(config),
        "package_version": __version__,
    }


def _damaged(source: str, what: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{source}: a checkpoint {what}; the file is damaged or was edited")


@attrs.frozen
class TrainingState:
    """A checkpoint's run state, checked: what resume, the evaluation command and `load_decoder` read."""

    trainer: Dict[str, Any]
    """`DecoderTrainer.state_dict()` (or one converted from DALLE2-pytorch)."""
    progress: Optional[Progress]
    """Where the run was; None for a DALLE2-pytorch checkpoint (see `reference`)."""
    reference: Optional[Dict[str, Any]] = None
    """A DALLE2-pytorch checkpoint's own progress (`epoch`, `sample`, `next_task`, ...) and `config`."""
    rng: List[Dict[str, Any]] = attrs.Factory(list)
    """Random-number states of every rank of the run that saved it, in rank order."""
    config_digest: Optional[str] = None
    package_version: Optional[str] = None

    @classmethod
    def from_checkpoint(cls, loaded: LoadedCheckpoint) -> "TrainingState":
        """The run state of a checkpoint read by `tracking.read_file`.

        Raises CheckpointFormatError naming the file, in one line, when an entry the training loop
        needs is missing or malformed.
        """
        source = loaded.source
        state = loaded.state or {}
        trainer = _trainer_state(state, source)
        reference = state.get("reference")
        progress = state.get("progress")
        if not isinstance(progress, Mapping) and not isinstance(reference, Mapping):
            raise _damaged(source, "without its 'progress' entry")
        parsed = None
        if isinstance(progress, Mapping):
            try:
                parsed = Progress.from_dict(progress)
            except (TypeError, ValueError) as error:
                raise _damaged(source, f"whose 'progress' entry does not load ({error})") from error
        rng = state.get("rng", [])
        if not isinstance(rng, list) or not all(isinstance(entry, Mapping) for entry in rng):
            raise _damaged(source, "whose 'rng' entry is not one random-number state per rank")
        return cls(
            trainer=trainer,
            progress=parsed,
            reference=dict(reference) if isinstance(reference, Mapping) else None,
            rng=list(rng),
            config_digest=state.get("config_digest"),
            package_version=state.get("package_version"),
        )
