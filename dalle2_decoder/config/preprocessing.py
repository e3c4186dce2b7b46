"""Checking `data.preprocessing` (torchvision transforms by name) while the configuration loads.

The data pipeline owns the real validation (`dalle2_decoder.data.transforms.validate_preprocessing`,
which builds each transform); this module calls it and places each of its problems at
`data.preprocessing.<TransformName>`. `basic_preprocessing_problems` is the stand-in used when
that function cannot be imported: it checks names and keyword arguments against torchvision.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, List, Mapping

from .checks import closest, show
from .structure import join_path


def basic_preprocessing_problems(spec: Mapping[str, Any]) -> List[str]:
    """`Name: message` problems: unknown transform names and unknown keyword arguments."""
    from torchvision import transforms

    available = {name for name in dir(transforms) if name[:1].isupper() and inspect.isclass(getattr(transforms, name))}
    problems = []
    for name, arguments in spec.items():
        if name not in available:
            match = closest(name, available)
            problems.append(f"{name}: unknown transform" + (f" (did you mean {match}?)" if match else ""))
            continue
        if isinstance(arguments, Mapping):
            parameters = inspect.signature(getattr(transforms, name)).parameters
            for key in arguments:
                if key not in parameters:
                    match = closest(key, parameters)
                    problems.append(
                        f"{name}: unknown argument {show(key)}" + (f" (did you mean {match}?)" if match else "")
                    )
        elif not isinstance(arguments, (bool, list, int, float, str)) and arguments is not None:
            problems.append(f"{name}: expected true, an object of arguments or a list, got {show(arguments)}")
    return problems


def _validator() -> Callable[[Mapping[str, Any]], List[str]]:
    try:
        from ..data.transforms import validate_preprocessing
    except ImportError:
        return basic_preprocessing_problems
    return validate_preprocessing


def preprocessing_problems(spec: Mapping[str, Any], path: str = "data.preprocessing") -> List[str]:
    """Problems of a preprocessing spec as `path: reason` lines, each at its transform's path."""
    lines = []
    for problem in _validator()(spec):
        name, separator, message = problem.partition(": ")
        if separator and name in spec:
            lines.append(f"{join_path(path, name)}: {message}")
        else:
            lines.append(f"{path}: {problem}")
    return lines
