"""Problems as `path: reason` lines: the shape every rule of the package reports in.

A rule is a function that returns one line per problem (empty when the value is fine), naming the
option by the path its caller gives: `decoder.sample_timesteps[1]` when a config is checked,
`sample_timesteps` when a constructor is called directly. The config check collects the lines of
every rule; a constructor raises them (`raise_problems`). So one rule has one wording wherever it
is broken.
"""

from __future__ import annotations

import difflib
import json
from typing import Any, Iterable, List, Optional, Sequence


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


def one_of(path: str, value: Any, choices: Iterable[str]) -> List[str]:
    """`value` must be one of `choices`; a near miss is named as the likely intent."""
    choices = list(choices)
    if value in choices:
        return []
    match = closest(value, choices) if isinstance(value, str) else None
    hint = f" (did you mean {match}?)" if match else ""
    return [f"{path}: unknown value {show(value)}{hint}; expected one of {', '.join(choices)}"]


def indexed(path: str, value: Any, index: int) -> str:
    """The path of entry `index` of an option given one value or a list: `path[index]` for a list, `path` else."""
    return f"{path}[{index}]" if isinstance(value, (list, tuple)) else path


def raise_problems(owner: str, problems: Sequence[str]) -> None:
    """Raise one ValueError that lists `problems` under `owner` (e.g. `Decoder`); nothing when there are none."""
    if problems:
        raise ValueError("\n".join(f"{owner}: {problem}" for problem in problems))
