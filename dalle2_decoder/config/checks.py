"""Small helpers for the cross-field checks that each section's `check` method runs.

Every helper returns a list of `path: reason` lines (empty when fine), so a section's `check`
reads as one list of rules and every problem is reported, not just the first.
"""

from __future__ import annotations

import difflib
import json
from typing import Any, Iterable, List, Optional, Sequence, TypeVar, Union

from ..common.per_unet import as_list, per_unet

T = TypeVar("T")


def closest(word: str, candidates: Iterable[str]) -> Optional[str]:
    """The candidate closest to `word` (a likely misspelling), or None when none is close."""
    matches = difflib.get_close_matches(str(word), sorted(set(candidates)), n=1, cutoff=0.7)
    return matches[0] if matches else None


def show(value: Any, limit: int = 60) -> str:
    """A short JSON-style rendering of a value for error messages."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def one_of(path: str, value: Any, choices: Iterable[str]) -> List[str]:
    choices = list(choices)
    if value in choices:
        return []
    match = closest(value, choices) if isinstance(value, str) else None
    hint = f" (did you mean {match}?)" if match else ""
    return [f"{path}: unknown value {show(value)}{hint}; expected one of {', '.join(choices)}"]


def not_empty(path: str, value: Optional[str]) -> List[str]:
    if value is None or value.strip():
        return []
    return [f"{path}: must not be empty"]
