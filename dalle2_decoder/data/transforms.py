"""Image preprocessing from the `data.preprocessing` spec: torchvision transforms by name.

What a spec means and its problems are the configuration's (`dalle2_decoder.config.preprocessing`,
so the config check and the loader cannot disagree); here the steps become the loader's image
transform. A `ToTensor` is appended when the spec has none, so images always leave the
pipeline as float tensors in [0, 1] (unless the spec adds `Normalize` after it).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, List, Mapping, Optional, Tuple

import torch
from torchvision import transforms as T

from ..config.preprocessing import available_transforms, transform_steps, validate_preprocessing
from ..failures import EXIT_DATA

__all__ = [
    "PreprocessingError",
    "available_transforms",
    "build_transform",
    "split_transform",
    "validate_preprocessing",
]


class PreprocessingError(ValueError):
    """The preprocessing spec names an unknown transform or gives one arguments it does not take.

    `problems` holds `(transform_name, message)` pairs, one per problem, all found at once.
    """

    exit_status: ClassVar[int] = EXIT_DATA

    def __init__(self, problems: List[Tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"preprocessing.{name}: {message}" for name, message in problems))


def split_transform(spec: Mapping[str, Any]) -> Tuple[Optional[Callable], Optional[Callable]]:
    """The spec as (steps on the PIL image before ToTensor, steps on the float tensor after it).

    The loader does the ToTensor step itself, straight into the batch tensor (one pass instead of
    ToTensor's four); the values are the same. Raises like `build_transform`.
    """
    steps, problems = transform_steps(spec)
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
    steps, problems = transform_steps(spec)
    if problems:
        raise PreprocessingError(problems)
    if not any(isinstance(step, (T.ToTensor, T.PILToTensor)) for step in steps):
        steps.append(T.ToTensor())
    elif any(isinstance(step, T.PILToTensor) for step in steps):
        # PILToTensor gives uint8; the loader promises floats in [0, 1].
        steps.append(T.ConvertImageDtype(torch.float32))
    return T.Compose(steps)
