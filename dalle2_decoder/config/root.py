"""The whole run's configuration: one JSON file."""

from __future__ import annotations

import json
import os
import typing
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import attrs

from .compat import adapt_reference_options
from .data import DataConfig
from .decoder import DecoderConfig
from .errors import ConfigError, ConfigWarning
from .evaluate import EvaluateConfig
from .limits import cross_section_problems, non_finite_numbers
from .recipes import DEFAULT_RECIPE, RECIPES, apply_recipe
from .structure import UnknownOptionError, converter, structure_at
from .tracker import TrackerConfig
from .train import TrainConfig

# The order of the reference's files, then this package's `recipe`.
_SECTION_ORDER = ("decoder", "data", "train", "evaluate", "tracker", "seed", "recipe")


@attrs.frozen
class TrainDecoderConfig:
    """Top level of a decoder training config."""

    decoder: DecoderConfig
    """The decoder model."""
    data: DataConfig
    """Data loading."""
    tracker: TrackerConfig
    """Logging, loading and saving."""
    train: TrainConfig = attrs.field(factory=TrainConfig)
    """Training hyperparameters."""
    evaluate: EvaluateConfig = attrs.field(factory=EvaluateConfig)
    """Evaluation metrics."""
    seed: int = 0
    """Seed for the data splits, shuffling, model initialisation and sampling."""
    recipe: str = DEFAULT_RECIPE
    """A named set of option values filled in where the config leaves them out (`config/recipes.py`,
    docs/RECIPE.md); `reference`, the default, changes nothing."""

    # --- loading ------------------------------------------------------------------------------

    @classmethod
    def from_json_path(cls, path: Union[str, "os.PathLike[str]"]) -> "TrainDecoderConfig":
        """Read and check a JSON config file; raises `ConfigError` listing every problem."""
        return cls.from_dict(cls.read_json(path), source=os.fspath(path))

    @staticmethod
    def read_json(path: Union[str, "os.PathLike[str]"]) -> Any:
        """The parsed JSON of a config file; raises `ConfigError` when it cannot be read or parsed."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as file:
                return json.load(file)
        except IsADirectoryError:
            raise ConfigError(["is a folder, not a JSON file"], source=path) from None
        except OSError as error:
            raise ConfigError([f"cannot read the file: {error.strerror or error}"], source=path) from None
        except UnicodeDecodeError as error:
            raise ConfigError(
                [
                    f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
                    "save the config as UTF-8 JSON"
                ],
                source=path,
            ) from None
        except json.JSONDecodeError as error:
            raise ConfigError(
                [f"not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"], source=path
            ) from None
        except RecursionError:
            raise ConfigError(["not a usable config: its JSON is nested too deeply"], source=path) from None

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "configuration") -> "TrainDecoderConfig":
        """Structure and check a config given as parsed JSON.

        Raises `ConfigError` listing every problem, each as `path: reason`. Options that are
        accepted but have no effect are reported as `ConfigWarning`s.
        """
        config, problems, notes = cls.resolve(raw)
        for note in notes:
            warnings.warn(note, ConfigWarning, stacklevel=2)
        if problems:
            raise ConfigError(problems, source=source)
        return config

    @classmethod
    def resolve(cls, raw: Any) -> Tuple[Optional["TrainDecoderConfig"], List[str], List[str]]:
        """(config or None, problems, notes): the whole check without raising or warning.

        Each section is structured on its own, so a problem in one does not hide those in the
        others; the cross-field checks then run on every section that structured.
        """
        if not isinstance(raw, Mapping):
            return None, [f"the configuration must be a JSON object, got {type(raw).__name__}"], []
        raw, notes, problems = adapt_reference_options(dict(raw))
        raw, recipe_problems = apply_recipe(raw)
        problems += recipe_problems
        problems += non_finite_numbers(raw)
        sections: Dict[str, Any] = {}
        fields = {field.name: field for field in attrs.fields(cls)}
        types = typing.get_type_hints(cls)
        for key in raw:
            if key not in fields:
                problems.append(f"{key}: {UnknownOptionError(key, fields)}")
        for name in _SECTION_ORDER:
            field = fields[name]
            if name in raw:
                sections[name], section_problems = structure_at(raw[name], types[name], name)
                problems += section_problems
            elif field.default is attrs.NOTHING:
                sections[name] = None
                problems.append(f"{name}: required section missing")
            else:
                sections[name] = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
        if problems:
            view = _Sections(**sections)
            for section in view.structured():
                problems += section.check(view)
            problems += cross_section_problems(view)
            return None, list(dict.fromkeys(problems)), notes
        config = cls(**sections)
        problems = config.problems()
        notes += config.notes()
        return (None if problems else config), problems, notes

    # --- checks -------------------------------------------------------------------------------

    def problems(self) -> List[str]:
        """Every cross-field problem, as `path: reason` lines (empty for a valid config)."""
        view = _Sections.of(self)
        problems = [problem for section in view.structured() for problem in section.check(self)]
        if self.recipe not in RECIPES:
            problems.append(f"recipe: unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        return list(dict.fromkeys(problems + cross_section_problems(view)))

    def notes(self) -> List[str]:
        """Options that are accepted but have no effect, as `path: explanation` lines."""
        return [
            note
            for section in _Sections.of(self).structured()
            if hasattr(section, "notes")
            for note in section.notes(self)
        ]

    # --- output -------------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """The resolved configuration as JSON-ready data, every default filled in.

        `TrainDecoderConfig.from_dict(config.to_dict())` gives back an equal configuration.
        """
        return json.loads(json.dumps(converter.unstructure(self)))

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


@attrs.frozen
class _Sections:
    """The sections of a config, where the ones that failed to structure are None.

    Section checks are written against this shape (the same attribute names as the config), so
    cross-field checks run on whatever structured.
    """

    decoder: Optional[DecoderConfig]
    data: Optional[DataConfig]
    tracker: Optional[TrackerConfig]
    train: Optional[TrainConfig]
    evaluate: Optional[EvaluateConfig]
    seed: Optional[int]
    recipe: Optional[str]

    @classmethod
    def of(cls, config: TrainDecoderConfig) -> "_Sections":
        return cls(**{field.name: getattr(config, field.name) for field in attrs.fields(TrainDecoderConfig)})

    def structured(self) -> List[Any]:
        return [
            section
            for section in (self.decoder, self.data, self.train, self.evaluate, self.tracker)
            if section is not None
        ]
