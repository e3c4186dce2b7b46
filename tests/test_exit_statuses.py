"""Each error declares its own exit status; `failures` classifies by that declaration alone."""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import pytest

from dalle2_decoder import failures
from dalle2_decoder.clip import ClipLoadError
from dalle2_decoder.config import ConfigError
from dalle2_decoder.data import BadDataError, DataSetupError, PreprocessingError
from dalle2_decoder.data.tar_reader import ShardReadError
from dalle2_decoder.failures import (
    EXIT_CHECKPOINT,
    EXIT_CONFIG,
    EXIT_DATA,
    EXIT_IO,
    EXIT_USAGE,
    PreflightError,
    Problem,
    UsageError,
    describe,
    exit_status_of,
)
from dalle2_decoder.sample import SampleInputError
from dalle2_decoder.tracking import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    DataPathError,
    LoadError,
    SaveError,
    TrackerSetupError,
)

OWN_ERRORS = [
    (lambda: ConfigError(["seed: must be an integer"]), EXIT_CONFIG),
    (lambda: UsageError("--count must be at least 1"), EXIT_USAGE),
    (lambda: SampleInputError("no captions"), EXIT_USAGE),
    (lambda: BadDataError("too many bad samples"), EXIT_DATA),
    (lambda: DataSetupError("no shards"), EXIT_DATA),
    (lambda: PreprocessingError([("Resise", "unknown transform")]), EXIT_DATA),
    (lambda: ShardReadError("shard 3 broke off"), EXIT_DATA),
    (lambda: CheckpointError("unreadable"), EXIT_CHECKPOINT),
    (lambda: CheckpointFormatError("not a checkpoint"), EXIT_CHECKPOINT),
    (lambda: CheckpointMismatchError("file.pth", ["a"], [], []), EXIT_CHECKPOINT),
    (lambda: LoadError("no such run"), EXIT_CHECKPOINT),
    (lambda: DataPathError("data_path is a file"), EXIT_IO),
    (lambda: SaveError("no repo"), EXIT_IO),
    (lambda: TrackerSetupError(["wandb entity missing"]), EXIT_IO),
    (lambda: ClipLoadError("install open_clip"), EXIT_IO),
]


@pytest.mark.parametrize("make, status", OWN_ERRORS, ids=lambda value: getattr(value, "__name__", str(value)))
def test_each_error_reports_the_status_its_class_declares(make, status):
    error = make()
    assert type(error).exit_status == status
    code, lines = describe(error)
    assert code == status
    assert lines and str(error).splitlines()[-1].strip() in "\n".join(lines)


def test_a_declared_status_is_inherited_and_nothing_else_is_needed():
    class ParentError(RuntimeError):
        exit_status = EXIT_DATA

    class ChildError(ParentError):
        pass

    assert describe(ChildError("shard 4 is gone")) == (EXIT_DATA, ["error: shard 4 is gone"])
    assert describe(RuntimeError("no declaration")) is None  # undeclared: a bug, with its traceback


def test_a_preflight_report_exits_with_its_most_basic_problem():
    error = PreflightError([Problem(EXIT_DATA, "no shards in /data"), Problem(EXIT_CONFIG, "bad seed")], "cfg.json")
    assert error.exit_status == exit_status_of(error) == EXIT_CONFIG
    assert describe(error) == (EXIT_CONFIG, ["cfg.json: 2 problems", "  no shards in /data", "  bad seed"])
    assert exit_status_of(PreflightError([Problem(EXIT_IO, "read-only folder")])) == EXIT_IO


def test_an_exit_status_only_an_instance_carries_is_not_a_declaration():
    class ForeignError(RuntimeError):  # another library's error that happens to use the name
        def __init__(self):
            super().__init__("remote command failed")
            self.exit_status = 255

    assert exit_status_of(ForeignError()) is None and describe(ForeignError()) is None


def test_every_error_class_of_the_package_declares_its_exit_status():
    """docs/ARCHITECTURE.md: every error class says its own kind. Exempt: warnings, private errors
    caught inside their module, and the model layer's errors, which callers turn into their own."""
    import importlib
    import inspect
    import pkgutil

    import dalle2_decoder

    undeclared = []
    for info in pkgutil.walk_packages(dalle2_decoder.__path__, "dalle2_decoder."):
        if info.name.endswith("__main__") or info.name.startswith("dalle2_decoder.models."):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            is_error = inspect.isclass(value) and issubclass(value, Exception) and not issubclass(value, Warning)
            if is_error and value.__module__ == info.name and not name.startswith("_"):
                if not hasattr(value, "exit_status"):
                    undeclared.append(f"{info.name}.{name}")
    assert not undeclared


def test_a_full_disk_under_a_declared_error_is_reported_as_io():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/runs/latest.pth")
        except OSError as cause:
            raise ShardReadError("writing the index failed") from cause
    except ShardReadError as error:
        code, lines = describe(error)
    assert code == EXIT_IO and "no space left on device while writing /runs/latest.pth" in lines[0]


def test_a_configuration_report_is_printed_as_it_is():
    error = ConfigError(["seed: must be an integer", "train.lr: must be finite"], source="cfg.json")
    assert describe(error) == (
        EXIT_CONFIG,
        ["cfg.json: 2 problems", "  seed: must be an integer", "  train.lr: must be finite"],
    )


def test_failures_imports_nothing_else_of_the_package():
    tree = ast.parse(Path(failures.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("dalle2_decoder"), ast.unparse(node)
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("dalle2_decoder") for alias in node.names), ast.unparse(node)
