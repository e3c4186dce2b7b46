"""Image preprocessing from the `data.preprocessing` spec: torchvision transforms by name.

The spec is an ordered mapping `{TransformName: arguments}` as written in the JSON config, where
the arguments are `true` (no arguments), an object (keyword arguments), a list (positional
arguments) or a single number/string (one positional argument); `false`/`null` leaves the
transform out. A `ToTensor` is appended when the spec has none, so images always leave the
pipeline as float tensors in [0, 1] (unless the spec adds `Normalize` after it).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple

import torch
from torchvision import transforms as T

from ..failures import EXIT_DATA

# Wrappers that take other transforms or Python callables: they cannot be written in JSON.
_NOT_CONFIGURABLE = {"Compose", "RandomApply", "RandomChoice", "RandomOrder", "Lambda", "InterpolationMode"}


def _available_transforms() -> Dict[str, type]:
    found = {}
    for name in dir(T):
        obj = getattr(T, name)
        if name[:1].isupper() and inspect.isclass(obj) and name not in _NOT_CONFIGURABLE and callable(obj):
            found[name] = obj
    return found


AVAILABLE_TRANSFORMS: Dict[str, type] = _available_transforms()
"""Every transform name the preprocessing spec accepts (the classes of `torchvision.transforms`)."""


class PreprocessingError(ValueError):
    """The preprocessing spec names an unknown transform or gives one arguments it does not take.

    `problems` holds `(transform_name, message)` pairs, one per problem, all found at once.
    """

    exit_status: ClassVar[int] = EXIT_DATA

    def __init__(self, problems: List[Tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"preprocessing.{name}: {message}" for name, message in problems))


def _arguments(value: Any) -> Tuple[tuple, dict]:
    if value is True:
        return (), {}
    if isinstance(value, Mapping):
        return (), dict(value)
    if isinstance(value, (list, tuple)):
        return tuple(value), {}
    return (value,), {}


def _closest(name: str) -> str:
    matches = difflib.get_close_matches(name, AVAILABLE_TRANSFORMS, n=1, cutoff=0.0)
    lowered = {known.lower(): known for known in AVAILABLE_TRANSFORMS}
    if name.lower() in lowered:
        return lowered[name.lower()]
    return matches[0] if matches else "ToTensor"


def _build(spec: Mapping[str, Any]) -> Tuple[List[Callable], List[Tuple[str, str]]]:
    steps: List[Callable] = []
    problems: List[Tuple[str, str]] = []
    if not isinstance(spec, Mapping):
        return steps, [("", f"must be an object of transform name -> arguments, got {type(spec).__name__}")]
    for name, value in spec.items():
        if value is False or value is None:
            continue
        cls = AVAILABLE_TRANSFORMS.get(name)
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
    _, problems = _build(spec)
    return [f"{name}: {message}" if name else message for name, message in problems]


def split_transform(spec: Mapping[str, Any]) -> Tuple[Optional[Callable], Optional[Callable]]:
    """The spec as (steps on the PIL image before ToTensor, steps on the float tensor after it).

    The loader does the ToTensor step itself, straight into the batch tensor (one pass instead of
    ToTensor's four); the values are the same. Raises like `build_transform`.
    """
    steps, problems = _build(spec)
    if problems:
        raise PreprocessingError(problems)
    at = next((i for i, step in enumerate(steps) if isinstance(step, (T.ToTensor, T.PILToTensor))), len(steps))
    before = [step for step in steps[:at]]
    after = [step for step in steps[at + 1 :] if not isinstance(step, T.ConvertImageDtype)]
    return (T.Compose(before) if before else None), (T.Compose(after) if after else None)


def build_transform(spec: Mapping[str, Any]) -> Callable:
    """The image transform (PIL image -> float tensor (3, H, W)) for a preprocessing spec.

    Raises `PreprocessingError` (a `ValueError`) naming each unknown transform with the closest
    valid name, and each transform whose arguments its constructor rejects.
    """
    steps, problems = _build(spec)
    if problems:
        raise PreprocessingError(problems)
    if not any(isinstance(step, (T.ToTensor, T.PILToTensor)) for step in steps):
        steps.append(T.ToTensor())
    elif any(isinstance(step, T.PILToTensor) for step in steps):
        # PILToTensor gives uint8; the loader promises floats in [0, 1].
        steps.append(T.ConvertImageDtype(torch.float32))
    return T.Compose(steps)
