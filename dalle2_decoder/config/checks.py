"""Small helpers for the cross-field checks that each section's `check` method runs.

Every helper returns a list of `path: reason` lines (empty when fine), so a section's `check`
reads as one list of rules and every problem is reported, not just the first. The helpers that
rules below the config (the models') use too live in `common.problems`.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, TypeVar, Union

from ..common.per_unet import as_list, per_unet
from ..common.problems import closest as closest
from ..common.problems import one_of as one_of
from ..common.problems import show

T = TypeVar("T")


def entries(value: Union[T, Sequence[T]], num_unets: int) -> List[T]:
    """A per-U-Net option's values for checking: a list as written, a single value once per U-Net.

    Unlike `common.per_unet.per_unet`, a list of the wrong length is taken as it is: `one_per_unet`
    reports its length, and the checks of its entries still run.
    """
    return as_list(value) if isinstance(value, (list, tuple)) else per_unet(value, num_unets)


def one_per_unet(path: str, value: Any, num_unets: Optional[int]) -> List[str]:
    """A list-valued option must have exactly one entry per U-Net."""
    if num_unets is None or not isinstance(value, (list, tuple)) or len(value) == num_unets:
        return []
    return [
        f"{path}: has {len(value)} entries but decoder.unets has {num_unets} U-Net{'s' if num_unets != 1 else ''}; "
        "give one value for all U-Nets or one per U-Net"
    ]


def at_least(path: str, value: Any, minimum: float) -> List[str]:
    if value is None or value >= minimum:
        return []
    return [f"{path}: must be at least {minimum} (got {show(value)})"]


def in_range(path: str, value: Any, low: float, high: float, *, high_inclusive: bool = True) -> List[str]:
    if value is None:
        return []
    inside = low <= value <= high if high_inclusive else low <= value < high
    if inside:
        return []
    bracket = "]" if high_inclusive else ")"
    return [f"{path}: must be in [{low}, {high}{bracket} (got {show(value)})"]


def not_empty(path: str, value: Optional[str]) -> List[str]:
    if value is None or value.strip():
        return []
    return [f"{path}: must not be empty"]
