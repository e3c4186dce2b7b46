"""The values of every option that takes one of a fixed set, for the commands' `--help`.

Each list is the one the code itself uses (the `Literal` kinds the JSON is structured by, the
tuples the checks compare with), never a copy, so `--help` cannot fall behind a new logger,
saver or sampler.
"""

from __future__ import annotations

from typing import List, Tuple

from .decoder import BETA_SCHEDULES, CLIP_MAKES, LOSS_TYPES, SAMPLERS
from .structure import union_kinds
from .tracker import LoadConfig, LogConfig, SaveConfig, SaveTargets
from .train import EMA_WARMUPS, LR_SCHEDULES, MIXED_PRECISION


def _literal_values(cls: type, name: str) -> Tuple[str, ...]:
    import typing

    return tuple(typing.get_args(typing.get_type_hints(cls)[name]))


def option_choices() -> List[Tuple[str, Tuple[str, ...]]]:
    """(option path, the values it takes), in the order of the config sections."""
    return [
        ("decoder.samplers", SAMPLERS),
        ("decoder.beta_schedule", BETA_SCHEDULES),
        ("decoder.loss_type", LOSS_TYPES),
        ("decoder.clip.make", CLIP_MAKES),
        ("train.mixed_precision", MIXED_PRECISION),
        ("train.ema_warmup", EMA_WARMUPS),
        ("train.lr_schedule", LR_SCHEDULES),
        ("tracker.log.log_type", tuple(union_kinds(LogConfig)[1])),
        ("tracker.load.load_from", tuple(union_kinds(LoadConfig)[1])),
        ("tracker.save[].save_to", tuple(union_kinds(SaveConfig)[1])),
        ("tracker.save[].save_type", _literal_values(SaveTargets, "save_type")),
    ]


def choices_epilog() -> str:
    """The `--help` epilog that lists them, one option a line."""
    width = max(len(path) for path, _ in option_choices())
    lines = [f"  {path:<{width}}  {', '.join(values)}" for path, values in option_choices()]
    return "options that take one of a set of values (docs/CONFIG.md has them all):\n" + "\n".join(lines)
