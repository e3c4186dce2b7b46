"""Options kept only so that configs written for the reference implementation still load."""

from __future__ import annotations

import warnings
from typing import Any, Set, Tuple

_warned: Set[Tuple[str, str]] = set()


def warn_no_effect(owner: str, name: str, value: Any, default: Any) -> None:
    """Warn once per (owner, option) when an accepted-but-ignored option is set to a non-default value."""
    if value == default or (owner, name) in _warned:
        return
    _warned.add((owner, name))
    warnings.warn(
        f"{owner}: option {name}={value!r} is accepted for compatibility with DALLE2-pytorch configs "
        "and has no effect here",
        stacklevel=3,
    )
