"""The package's layers: every import points down (docs/ARCHITECTURE.md).

The test reads the source (no import is executed) and follows every import statement, the ones
inside functions and under TYPE_CHECKING included: a function-level import is still a dependency,
only a hidden one. `__main__.py` modules are exempt: they are entry points that Python runs, never
imported by another module, and so part of the command layer wherever they live.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = "dalle2_decoder"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

LAYERS: List[Tuple[str, List[str]]] = [
    ("bottom: shared rules", ["_version", "common", "failures"]),
    ("the model", ["models"]),
    ("configuration", ["config"]),
    ("inputs", ["clip", "data"]),
    ("services", ["tracking", "preflight", "runtime", "stopping"]),
    ("evaluation", ["evaluation"]),
    ("training", ["training"]),
    ("commands and facades", ["cli", "evaluate", "sample", "convert", "posthoc_ema", "loading", "report", "__init__"]),
]
"""Lowest first. A module may import its own layer and the ones below; units of one layer must not
form a cycle either (checked separately)."""

LAYER_OF: Dict[str, int] = {unit: index for index, (_, units) in enumerate(LAYERS) for unit in units}


def layer_name(unit: str) -> str:
    return LAYERS[LAYER_OF[unit]][0] if unit in LAYER_OF else "no layer"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def unit_of(module: str) -> str:
    """The package or top-level module a module belongs to (`dalle2_decoder` itself is `__init__`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> List[Tuple[str, int]]:
    """(imported module of this package, line) for every import statement in the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module:
                found.append((target, node.lineno))
            else:  # `from . import x`: each name is a module of that package
                found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return [(name, line) for name, line in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


def source_files() -> List[Path]:
    return sorted(path for path in ROOT.rglob("*.py") if path.name != "__main__.py")


def dependencies() -> Dict[str, Set[Tuple[str, str]]]:
    """unit -> {(imported unit, "file:line")} for imports that cross units."""
    edges: Dict[str, Set[Tuple[str, str]]] = {}
    for path in source_files():
        source_unit = unit_of(module_name(path))
        for target, line in imports_of(path):
            target_unit = unit_of(target)
            if target_unit != source_unit:
                where = f"{path.relative_to(ROOT.parent)}:{line}"
                edges.setdefault(source_unit, set()).add((target_unit, where))
    return edges


def test_every_module_belongs_to_a_layer():
    units = {unit_of(module_name(path)) for path in source_files()}
    assert units - set(LAYER_OF) == set(), "place new modules in LAYERS (and in docs/ARCHITECTURE.md)"


def test_imports_point_down_the_layers():
    upward = [
        f"{where}: {unit} ({layer_name(unit)}) imports {target} ({layer_name(target)})"
        for unit, targets in dependencies().items()
        for target, where in sorted(targets, key=lambda item: item[1])
        if LAYER_OF.get(target, -1) > LAYER_OF.get(unit, -1)
    ]
    assert upward == []


def test_no_import_cycle_between_packages():
    graph = {unit: {target for target, _ in targets} for unit, targets in dependencies().items()}
    cycles = []
    for start in graph:
        # every unit that `start` reaches; a cycle exists when `start` reaches itself
        seen, stack = set(), list(graph[start])
        while stack:
            unit = stack.pop()
            if unit == start:
                cycles.append(start)
                break
            if unit not in seen:
                seen.add(unit)
                stack.extend(graph.get(unit, ()))
    assert cycles == []


@pytest.mark.parametrize(
    "source, imported",
    [
        ("from ..training.loop import used_unets", "training"),  # function-level and relative
        ("from .. import training", "training"),
        ("import dalle2_decoder.training.loop", "training"),
    ],
)
def test_the_walk_sees_every_form_of_import(tmp_path, monkeypatch, source, imported):
    """The checker itself: an upward import written in any form is found (so a green run means something)."""
    package = tmp_path / PACKAGE / "evaluation"
    package.mkdir(parents=True)
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "probe.py").write_text(f"def f():\n    {source}\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path / PACKAGE)
    assert dependencies() == {"evaluation": {(imported, f"{PACKAGE}/evaluation/probe.py:2")}}
    with pytest.raises(AssertionError):
        test_imports_point_down_the_layers()


def test_the_architecture_document_names_every_unit_of_every_layer():
    """docs/ARCHITECTURE.md's layer table is the human side of LAYERS: a unit added here must be described there."""
    document = (ROOT.parent / "docs" / "ARCHITECTURE.md").read_text()
    rows = [line for line in document.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(LAYERS)
    for row, (_, units) in zip(rows, LAYERS):
        for unit in units:
            written = f"`{unit}/`" if (ROOT / unit).is_dir() else f"`{unit}.py`"
            assert written in row, f"{written} missing from the row {row[:40]!r} of docs/ARCHITECTURE.md"
