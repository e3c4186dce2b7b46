"""The JSON shapes of configuration types: which annotation is a union, a list or a fixed tuple,
and how a type is named in a problem line (`Union[float, List[float]]` -> `a number or a list of
numbers`)."""

from __future__ import annotations

import collections.abc
import types
from typing import Any, Literal, Optional, Tuple, Union, get_args, get_origin

import attrs

from .checks import show

NoneType = type(None)

_NAMES = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    bool: ("true or false", "booleans"),
    str: ("a string", "strings"),
    NoneType: ("null", "nulls"),
    Any: ("any value", "values"),
}


def is_union(tp: Any) -> bool:
    return get_origin(tp) is Union or isinstance(tp, types.UnionType)


def sequence_element(tp: Any) -> Optional[Any]:
    """The element type of a homogeneous list / sequence / `Tuple[X, ...]` type, else None."""
    origin = get_origin(tp)
    args = get_args(tp)
    if tp in (list, tuple, collections.abc.Sequence):
        return Any
    if origin in (list, collections.abc.Sequence, collections.abc.MutableSequence):
        return args[0] if args else Any
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


def fixed_tuple(tp: Any) -> Optional[Tuple[Any, ...]]:
    """The element types of a fixed-length `Tuple[A, B]` type, else None."""
    args = get_args(tp)
    if get_origin(tp) is tuple and args and Ellipsis not in args:
        return args
    return None


def _plural(tp: Any) -> str:
    if tp in _NAMES:
        return _NAMES[tp][1]
    if is_union(tp):
        return " or ".join(_plural(arg) for arg in get_args(tp))
    return "values"


def describe(tp: Any) -> str:
    """`Union[float, List[float]]` -> `a number or a list of numbers`."""
    if tp in _NAMES:
        return _NAMES[tp][0]
    if is_union(tp):
        return " or ".join(describe(arg) for arg in get_args(tp))
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(show(arg) for arg in get_args(tp))
    element = sequence_element(tp)
    if element is not None:
        return "a list" if element is Any else f"a list of {_plural(element)}"
    if fixed_tuple(tp) is not None:
        return f"a list of {len(fixed_tuple(tp))} values"
    if attrs.has(tp) or get_origin(tp) in (dict, collections.abc.Mapping) or tp is dict:
        return "an object"
    return getattr(tp, "__name__", str(tp))


def is_plain_json_type(tp: Any) -> bool:
    """Whether `tp` is built only from JSON-like types, so the converter can check values against it."""
    if tp in _NAMES:
        return True
    if is_union(tp) or get_origin(tp) in (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence):
        return all(arg is Ellipsis or is_plain_json_type(arg) for arg in get_args(tp))
    if get_origin(tp) is Literal:
        return True
    if get_origin(tp) in (dict, collections.abc.Mapping):
        return all(is_plain_json_type(arg) for arg in get_args(tp))
    return False
