"""`data.preprocessing`: torchvision transforms by name, checked while the configuration loads.

The spec is an ordered mapping `{TransformName: arguments}` as written in the JSON config, where
the arguments are `true` (no arguments), an object (keyword arguments), a list (positional
arguments) or a single number/string (one positional argument); `false`/`null` leaves the
transform out. This module owns what a spec means (`transform_steps`) and its problems; the data
pipeline (`dalle2_decoder.data.transforms`) builds its image transform from the same steps, so
the config check and the loader cannot disagree.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Callable, Dict, List, Mapping, Tuple

from .structure import join_path

# Wrappers that take other transforms or Python callables: they cannot be written in JSON.
_NOT_CONFIGURABLE = {"Compose", "RandomApply", "RandomChoice", "RandomOrder", "Lambda", "InterpolationMode"}


@functools.lru_cache(maxsize=None)
def available_transforms() -> Dict[str, type]:
    """Every transform name the preprocessing spec accepts (the classes of `torchvision.transforms`)."""
    from torchvision import transforms  # imported on first use: loading a config stays light

    found = {}
    for name in dir(transforms):
        obj = getattr(transforms, name)
        if name[:1].isupper() and inspect.isclass(obj) and name not in _NOT_CONFIGURABLE and callable(obj):
            found[name] = obj
    return found


def _arguments(value: Any) -> Tuple[tuple, dict]:
    if value is True:
        return (), {}
    if isinstance(value, Mapping):
        return (), dict(value)
    if isinstance(value, (list, tuple)):
        return tuple(value), {}
    return (value,), {}


def _closest(name: str) -> str:
    available = available_transforms()
    lowered = {known.lower(): known for known in available}
    if name.lower() in lowered:
        return lowered[name.lower()]
    matches = difflib.get_close_matches(name, available, n=1, cutoff=0.0)
    return matches[0] if matches else "ToTensor"


def transform_steps(spec: Mapping[str, Any]) -> Tuple[List[Callable], List[Tuple[str, str]]]:
    """(the spec's transforms, built in order; `(transform_name, message)` for each problem).

    A transform is built to check it: its constructor's own message says what is wrong with
    its arguments. A problem of the whole spec has the name "".
    """
    steps: List[Callable] = []
    problems: List[Tuple[str, str]] = []
    if not isinstance(spec, Mapping):
        return steps, [("", f"must be an object of transform name -> arguments, got {type(spec).__name__}")]
    for name, value in spec.items():
        if value is False or value is None:
            continue
        cls = available_transforms().get(name)
        if cls is None:
            problems.append((name, f"unknown transform {name!r}; did you mean {_closest(name)!r}?"))
            continue
        args, kwargs = _arguments(value)
        try:
            steps.append(cls(*args, **kwargs))
        except Exception as error:  # the constructor's own message says what is wrong
            problems.append((name, f"bad arguments {value!r} for torchvision.transforms.{name}: {error}"))
    return steps, problems


def validate_preprocessing(spec: Mapping[str, Any]) -> List[str]:
    """Every problem of a preprocessing spec, as `"<TransformName>: <message>"` strings (empty if fine)."""
    _, problems = transform_steps(spec)
    return [f"{name}: {message}" if name else message for name, message in problems]


def preprocessing_problems(spec: Mapping[str, Any], path: str = "data.preprocessing") -> List[str]:
    """Problems of a preprocessing spec as `path: reason` lines, each at its transform's path."""
    _, problems = transform_steps(spec)
    return [f"{join_path(path, name)}: {message}" if name else f"{path}: {message}" for name, message in problems]
