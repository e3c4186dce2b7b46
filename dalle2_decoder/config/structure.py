"""JSON -> configuration classes, with one cattrs converter, and problems as `path: reason` lines.

What the converter adds to cattrs' defaults:
- primitives are strict: `"3"` is not an integer and `"false"` is not a boolean (cattrs would call
  `int()` / `bool()` on them); integral floats such as `1e5` are accepted where an integer is due;
- every unknown key is its own problem, with the closest valid name: `unknown option (did you mean
  dim_mults?)`;
- `UnetConfig` and `DecoderConfig` are open: a key that is not a declared field is checked against
  the `Unet` / `Decoder` constructor signature, structured by that parameter's annotation, and kept
  in `options`; unstructuring flattens `options` back, so the output round-trips;
- unions of attrs classes (the tracker families) are chosen by their `Literal` discriminator field
  (`log_type`, `load_from`, `save_to`); `tracker.save` also takes one object instead of a list and
  `{"load_from": null}` means no loader;
- other unions (`1e-4` or `[1e-4, 3e-5]`) pick the member by the JSON value's shape.
"""

from __future__ import annotations

import ast
import collections.abc
import functools
import inspect
import json
import re
import typing
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    get_args,
    get_origin,
)

import attrs
import cattrs
from cattrs.cols import list_structure_factory, mapping_structure_factory
from cattrs.errors import (
    AttributeValidationNote,
    BaseValidationError,
    ClassValidationError,
    ForbiddenExtraKeysError,
)
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn
from cattrs.v import format_exception

from ..failures import EXIT_CONFIG
from .checks import closest, show
from .decoder import DecoderConfig, UnetConfig
from .json_types import (
    NoneType,
    describe,
    fixed_tuple,
    is_plain_json_type,
    is_union,
    sequence_element,
)
from .tracker import SaveConfig

converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
"""The one converter for every configuration class."""


class ConfigValueError(ValueError):
    """A value that does not fit its option; the message is shown as is after the option's path."""

    exit_status: ClassVar[int] = EXIT_CONFIG


class UnknownOptionError(ConfigValueError):
    """A key that no option has; the message suggests the closest valid name."""

    def __init__(self, key: str, valid: typing.Iterable[str]):
        self.key = key
        match = closest(key, valid)
        super().__init__(f"unknown option (did you mean {match}?)" if match else "unknown option")


# --- errors at a field ------------------------------------------------------------------------


def _at(name: Union[str, int], exc: Exception) -> Exception:
    """Mark `exc` as belonging to the option `name` of the object being structured."""
    note = AttributeValidationNote(f"Structuring {name}", str(name), None)
    exc.__notes__ = [*getattr(exc, "__notes__", []), note]
    return exc


def _in_field(name: str, exc: Exception, owner: str) -> ClassValidationError:
    return ClassValidationError(f"While structuring {owner}", [_at(name, exc)], object)


# --- strict primitives ------------------------------------------------------------------------


def _structure_int(value: Any, _: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigValueError(f"expected an integer, got {show(value)}")


def _structure_float(value: Any, _: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ConfigValueError(f"expected a number, got {show(value)}")


def _structure_bool(value: Any, _: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigValueError(f"expected true or false, got {show(value)}")


def _structure_str(value: Any, _: Any) -> str:
    if isinstance(value, str):
        return value
    raise ConfigValueError(f"expected a string, got {show(value)}")


def _structure_literal(value: Any, tp: Any) -> Any:
    choices = get_args(tp)
    if isinstance(value, collections.abc.Hashable) and value in choices and type(value) in {type(c) for c in choices}:
        return value
    allowed = ", ".join(show(c) for c in choices)
    strings = [c for c in choices if isinstance(c, str)]
    match = closest(value, strings) if isinstance(value, str) else None
    hint = f"; did you mean {show(match)}?" if match else ""
    raise ConfigValueError(f"must be one of {allowed} (got {show(value)}{hint})")


# --- containers -------------------------------------------------------------------------------


def _sequence_hook_factory(tp: Any) -> Callable[[Any, Any], Any]:
    element = sequence_element(tp)
    as_tuple = get_origin(tp) is tuple or tp is tuple
    structure_items = list_structure_factory(List[element], converter)

    def structure_sequence(value: Any, _: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise ConfigValueError(f"expected {describe(tp)}, got {show(value)}")
        items = structure_items(list(value), List[element])
        return tuple(items) if as_tuple else items

    return structure_sequence


def _fixed_tuple_hook_factory(tp: Any) -> Callable[[Any, Any], Any]:
    elements = fixed_tuple(tp)

    def structure_fixed_tuple(value: Any, _: Any) -> tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(elements):
            raise ConfigValueError(f"expected {describe(tp)}, got {show(value)}")
        return tuple(converter.structure(item, element) for item, element in zip(value, elements))

    return structure_fixed_tuple


def _mapping_hook_factory(tp: Any) -> Callable[[Any, Any], Any]:
    structure_items = mapping_structure_factory(tp, converter)

    def structure_mapping(value: Any, _: Any) -> Any:
        if not isinstance(value, Mapping):
            raise ConfigValueError(f"expected an object, got {show(value)}")
        return structure_items(value, tp)

    return structure_mapping


# --- unions -----------------------------------------------------------------------------------


def _discriminator(members: Sequence[type]) -> Optional[str]:
    """The `Literal` field that tells the members apart (`log_type`, ...), if there is one.

    Every member has it, and no two members share one of its values: a `Literal` field the members
    have in common (the savers' `save_type`) does not say which member a JSON object is.
    """
    names = None
    values: Dict[str, List[Any]] = {}
    for member in members:
        hints = typing.get_type_hints(member)
        literal_fields = {a.name for a in attrs.fields(member) if get_origin(hints[a.name]) is Literal}
        names = literal_fields if names is None else names & literal_fields
        for name in literal_fields:
            values.setdefault(name, []).extend(get_args(hints[name]))
    first_fields = [a.name for a in attrs.fields(members[0])]
    for name in first_fields:
        if names and name in names and len(set(values[name])) == len(values[name]):
            return name
    return None


def union_kinds(tp: Any) -> Tuple[str, Dict[Any, type]]:
    """(discriminator field, {value: member class}) of a union of config classes: for `LogConfig`,
    ("log_type", {"console": ConsoleLogConfig, ...}). The one list JSON is structured by, errors
    name and `--help` shows."""
    members = [m for m in get_args(tp) if m is not NoneType]
    tag = _discriminator(members)
    if tag is None:
        raise TypeError(f"{tp}: a union of attrs classes needs a common Literal discriminator field")
    kinds: Dict[Any, type] = {}
    for member in members:
        for kind in get_args(typing.get_type_hints(member)[tag]):
            kinds[kind] = member
    return tag, kinds


def _tagged_union_hook_factory(tp: Any) -> Callable[[Any, Any], Any]:
    members = [m for m in get_args(tp) if m is not NoneType]
    optional = len(members) != len(get_args(tp))
    tag, kinds = union_kinds(tp)
    choices = ", ".join(str(kind) for kind in kinds)

    def structure_tagged(value: Any, _: Any) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, Mapping):
            raise ConfigValueError(f"expected an object with {tag} one of {choices}, got {show(value)}")
        if tag not in value:
            raise _in_field(tag, ConfigValueError(f"required option missing (one of {choices})"), tag)
        kind = value[tag]
        if kind is None and optional:
            return None  # {"load_from": null}: the reference trainer's way of saying "no loader"
        if not isinstance(kind, str) or kind not in kinds:
            match = closest(kind, kinds) if isinstance(kind, str) else None
            hint = f" (did you mean {match}?)" if match else ""
            message = f"unknown kind {show(kind)}{hint}; expected one of {choices}"
            raise _in_field(tag, ConfigValueError(message), tag)
        return converter.structure(value, kinds[kind])

    return structure_tagged


def _union_hook_factory(tp: Any) -> Callable[[Any, Any], Any]:
    members = get_args(tp)
    classes = [m for m in members if m is not NoneType]
    if len(classes) > 1 and all(attrs.has(m) for m in classes):
        return _tagged_union_hook_factory(tp)

    def is_list_type(member: Any) -> bool:
        return sequence_element(member) is not None or fixed_tuple(member) is not None

    def structure_union(value: Any, _: Any) -> Any:
        if value is None:
            if NoneType in members:
                return None
            raise ConfigValueError(f"expected {describe(tp)}, got null")
        shaped = isinstance(value, (list, tuple))
        candidates = [m for m in members if m is not NoneType and is_list_type(m) == shaped]
        failures: List[Exception] = []
        for member in candidates:
            try:
                return converter.structure(value, member)
            except (ValueError, TypeError, BaseValidationError) as exc:
                failures.append(exc)
        if len(failures) == 1 and isinstance(failures[0], BaseValidationError):
            raise failures[0]  # one list member: keep the element's own path and reason
        raise ConfigValueError(f"expected {describe(tp)}, got {show(value)}")

    return structure_union


# --- attrs classes: unknown keys and open constructor options --------------------------------


@functools.lru_cache(maxsize=None)
def constructor_parameters(qualified_name: str) -> Dict[str, Any]:
    """Keyword parameters of a class constructor (`module:Class`), by name, with their annotations."""
    module_name, class_name = qualified_name.split(":")
    module = __import__(module_name, fromlist=[class_name])
    init = getattr(module, class_name).__init__
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # an annotation that cannot be evaluated: accept any value for every parameter
        hints = {}
    parameters = {}
    for name, parameter in inspect.signature(init).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        parameters[name] = hints.get(name, Any)
    return parameters


REFERENCE_INT_FLAGS = {UnetConfig: ("self_attn",)}
"""Options DALLE2-pytorch's config declares as integers (`self_attn: ListOrTuple(int)`) that are flags here:
0 and 1 (what its recorded configs hold, pydantic having turned false and true into 0 and 1) mean false
and true."""


def _int_flags_as_bools(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if isinstance(value, list):
        return [_int_flags_as_bools(item) for item in value]
    return value


OPEN_CLASSES: Dict[type, str] = {
    UnetConfig: "dalle2_decoder.models.unet:Unet",
    DecoderConfig: "dalle2_decoder.models.decoder:Decoder",
}
"""Config classes whose undeclared keys are constructor parameters kept in `options`."""


def _attrs_hook_factory(cl: type) -> Callable[[Any, Any], Any]:
    structure_declared = make_dict_structure_fn(cl, converter, _cattrs_forbid_extra_keys=True)
    constructor = OPEN_CLASSES.get(cl)
    declared = {a.name for a in attrs.fields(cl)} - ({"options"} if constructor else set())

    def structure_attrs(value: Any, _: Any) -> Any:
        if not isinstance(value, Mapping):
            raise ConfigValueError(f"expected an object, got {show(value)}")
        parameters = constructor_parameters(constructor) if constructor else {}
        given: Dict[str, Any] = {}
        options: Dict[str, Any] = {}
        errors: List[Exception] = []
        for key, item in value.items():
            if key in declared:
                given[key] = item
            elif key in parameters:
                hint = parameters[key]
                if key in REFERENCE_INT_FLAGS.get(cl, ()):
                    item = _int_flags_as_bools(item)
                try:
                    options[key] = converter.structure(item, hint) if is_plain_json_type(hint) else item
                except Exception as exc:  # reported at the option, with the others
                    errors.append(_at(key, exc))
            else:
                errors.append(_at(key, UnknownOptionError(key, declared | set(parameters))))
        if constructor:
            given["options"] = options
        try:
            result = structure_declared(given, cl)
        except ClassValidationError as exc:
            errors = [*exc.exceptions, *errors]
        if errors:
            raise ClassValidationError(f"While structuring {cl.__name__}", errors, cl)
        return result

    return structure_attrs


def _open_unstructure_factory(cl: type) -> Callable[[Any], Dict[str, Any]]:
    unstructure_declared = make_dict_unstructure_fn(cl, converter)

    def unstructure_open(obj: Any) -> Dict[str, Any]:
        result = unstructure_declared(obj)
        options = result.pop("options")
        result.update(converter.unstructure(options))
        return result

    return unstructure_open


def _is_save_list(tp: Any) -> bool:
    return get_origin(tp) in (list, List) and get_args(tp) and get_args(tp)[0] == SaveConfig


def _save_list_hook_factory(tp: Any) -> Callable[[Any, Any], Any]:
    structure_list = _sequence_hook_factory(tp)

    def structure_savers(value: Any, _: Any) -> Any:
        return structure_list([value] if isinstance(value, Mapping) else value, tp)

    return structure_savers


# Registration order matters: hooks registered later take precedence.
converter.register_structure_hook(int, _structure_int)
converter.register_structure_hook(float, _structure_float)
converter.register_structure_hook(bool, _structure_bool)
converter.register_structure_hook(str, _structure_str)
converter.register_structure_hook_func(lambda tp: get_origin(tp) is Literal, _structure_literal)
converter.register_structure_hook_factory(lambda tp: sequence_element(tp) is not None, _sequence_hook_factory)
converter.register_structure_hook_factory(lambda tp: fixed_tuple(tp) is not None, _fixed_tuple_hook_factory)
converter.register_structure_hook_factory(
    lambda tp: tp is dict or get_origin(tp) in (dict, collections.abc.Mapping), _mapping_hook_factory
)
converter.register_structure_hook_factory(is_union, _union_hook_factory)
converter.register_structure_hook_factory(attrs.has, _attrs_hook_factory)
converter.register_structure_hook_factory(_is_save_list, _save_list_hook_factory)
for _open_class in OPEN_CLASSES:
    converter.register_unstructure_hook(_open_class, _open_unstructure_factory(_open_class))


# --- turning errors into lines ----------------------------------------------------------------


def _describe_exception(exc: BaseException, tp: Any) -> str:
    if isinstance(exc, ConfigValueError):
        return str(exc)
    if isinstance(exc, KeyError):
        return "required option missing"
    if isinstance(exc, ForbiddenExtraKeysError):  # not raised by our hooks; kept as a safety net
        return "unknown options: " + ", ".join(sorted(exc.extra_fields))
    if isinstance(exc, (ValueError, TypeError)) and str(exc):
        return str(exc)  # validators' own messages
    return format_exception(exc, tp)


_MAPPING_KEY = re.compile(r"\[('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\]")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def json_path(path: str) -> str:
    """cattrs' `a['key'][0]` -> JSON notation `a.key[0]` (quoted only where the key needs it)."""

    def replace(match: re.Match) -> str:
        key = ast.literal_eval(match.group(1))
        return f".{key}" if _IDENTIFIER.match(key) else f"[{json.dumps(key)}]"

    return _MAPPING_KEY.sub(replace, path)


def join_path(parent: str, child: Union[str, int]) -> str:
    """`join_path("a.b", 0)` -> `a.b[0]`; `join_path("a", "c")` -> `a.c`; `join_path("", "c")` -> `c`."""
    if isinstance(child, int):
        return f"{parent}[{child}]"
    if not _IDENTIFIER.match(child):
        return f"{parent}[{json.dumps(child)}]"
    return f"{parent}.{child}" if parent else child


def problems_from(exc: BaseException, path: str) -> List[str]:
    """`path: reason` lines for a structuring error raised while structuring the value at `path`."""
    lines = []
    for line in cattrs.transform_error(exc, path=path, format_exception=_describe_exception):
        reason, _, where = line.rpartition(" @ ")
        lines.append(f"{json_path(where)}: {reason}")
    return lines


def structure_at(value: Any, tp: Any, path: str) -> Tuple[Any, List[str]]:
    """Structure `value` as `tp`; returns (result or None, problems as `path: reason` lines)."""
    try:
        return converter.structure(value, tp), []
    except (BaseValidationError, ValueError, TypeError, KeyError) as exc:
        return None, problems_from(exc, path)
