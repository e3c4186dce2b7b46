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
    (
        "commands and facades",
        ["cli", "evaluate", "sample", "sample_inputs", "convert", "posthoc_ema", "loading", "report", "__init__"],
    ),
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


# --- other libraries' private names --------------------------------------------------------------

PRIVATE_USES_ALLOWED = {
    # DDP has no public way to leave parameters out; one function, pinned by tests/test_runtime.py
    ("dalle2_decoder/runtime.py", "DistributedDataParallel._set_params_and_buffers_to_ignore_for_model"),
    # the classes a reference file's pickled `packaging` Version holds, allowed by name for weights-only
    # loading; one function, `tracking.reference._version_classes`, pinned by tests/test_reference_checkpoints.py
    ("dalle2_decoder/tracking/reference.py", "version._Version"),
    ("dalle2_decoder/tracking/reference.py", "packaging._structures"),
}
"""(file, dotted use) of another library's private name that one wrapper owns (docs/ARCHITECTURE.md)."""

PUBLIC_DESPITE_THE_UNDERSCORE = {"os._exit", "sys._getframe"}
"""Names the Python documentation publishes with a leading underscore."""


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_library_uses(path: Path) -> List[Tuple[str, int]]:
    """(dotted use, line) of every `name._private` where `name` was imported from another library
    (`import torch`, `from torch.nn.parallel import DistributedDataParallel`), at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and not (node.module or "").startswith(PACKAGE):
            imported |= {alias.asname or alias.name for alias in node.names}
    imported -= {PACKAGE}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            modules = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [
            (module, node.lineno)
            for module in modules
            if not module.startswith(PACKAGE) and any(_private(part) for part in module.split("."))
        ]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, root = [node.attr], node.value
        while isinstance(root, ast.Attribute):
            chain.insert(0, root.attr)
            root = root.value
        if _private(node.attr) and isinstance(root, ast.Name) and root.id in imported:
            found.append((".".join([root.id] + chain), node.lineno))
    return found


def test_no_private_name_of_another_library_outside_its_one_wrapper():
    """docs/ARCHITECTURE.md: other libraries' private APIs are used nowhere, or behind one function."""
    uses = {
        (str(path.relative_to(ROOT.parent)), use, line)
        for path in source_files()
        for use, line in private_library_uses(path)
        if use not in PUBLIC_DESPITE_THE_UNDERSCORE
    }
    unexpected = sorted(f"{file}:{line}: {use}" for file, use, line in uses if (file, use) not in PRIVATE_USES_ALLOWED)
    assert not unexpected, "private names of other libraries (wrap them, see docs/ARCHITECTURE.md):\n" + "\n".join(
        unexpected
    )
    assert {(file, use) for file, use, _ in uses} == PRIVATE_USES_ALLOWED, "an allowed use is gone: drop it"


@pytest.mark.parametrize(
    "source, use",
    [
        ("import torch\ntorch._foreach_lerp_([], [], 0.5)\n", "torch._foreach_lerp_"),
        ("import torch.nn.functional as F\nF._canonical_mask\n", "F._canonical_mask"),
        ("from torch.optim import lr_scheduler\nlr_scheduler.LambdaLR._get_closed_form_lr\n", None),
        ("def f():\n    from torch._dynamo import config\n", "torch._dynamo.config"),
        ("import torch._C\n", "torch._C"),
    ],
)
def test_the_private_name_walk_finds_each_form(tmp_path, source, use):
    """The checker itself: a private name reached through any import form is found."""
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    found = [name for name, _ in private_library_uses(probe)]
    assert found == [use or "lr_scheduler.LambdaLR._get_closed_form_lr"]


def test_builders_take_runtime_objects_not_the_run_config():
    """docs/ARCHITECTURE.md: builders are given runtime objects and their own config section, never
    the whole run's config (so none of them reads a training run)."""
    import inspect

    from dalle2_decoder.evaluation import Evaluator
    from dalle2_decoder.tracking import create_tracker
    from dalle2_decoder.training.trainer import DecoderTrainer

    expected = {
        Evaluator: ["config", "accelerator", "loader"],
        DecoderTrainer: ["decoder", "accelerator", "config"],
        create_tracker: ["config"],
    }
    for builder, leading in expected.items():
        parameters = inspect.signature(builder).parameters
        assert list(parameters)[: len(leading)] == leading, builder
        annotations = " ".join(str(parameter.annotation) for parameter in parameters.values())
        assert "TrainDecoderConfig" not in annotations, builder
    assert "Accelerator" in str(inspect.signature(Evaluator).parameters["accelerator"].annotation)
    assert "Decoder" in str(inspect.signature(DecoderTrainer).parameters["decoder"].annotation)


def private_package_uses(path: Path) -> List[Tuple[str, int]]:
    """(use, line) where a module reaches into another module of the package: `from .x import _y`,
    or `x._y` with `x` a module of the package imported by name (`from .data import plan`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PACKAGE)):
            for alias in node.names:
                if _private(alias.name):
                    found.append((f"from {'.' * node.level}{node.module or ''} import {alias.name}", node.lineno))
                modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if isinstance(node.value, ast.Name) and node.value.id in modules:
                found.append((f"{node.value.id}.{node.attr}", node.lineno))
    return found


def test_no_module_reaches_into_another_modules_private_names():
    """What one module needs of another is that module's public function, so a private name can
    change with only its own module to read (docs/ARCHITECTURE.md)."""
    uses = [
        f"{path.relative_to(ROOT.parent)}:{line}: {use}"
        for path in source_files()
        for use, line in private_package_uses(path)
    ]
    assert not uses, "\n".join(uses)


def test_the_package_walk_finds_each_form(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from .data import plan\nfrom .data.loader import _peek\n"
        "def f():\n    from ..tracking import run_state as rs\n    return plan._ranges, rs._refuse\n"
    )
    assert sorted(use for use, _ in private_package_uses(probe)) == [
        "from .data.loader import _peek",
        "plan._ranges",
        "rs._refuse",
    ]


def test_the_training_command_leaves_the_metrics_libraries_to_runs_that_evaluate():
    """torchmetrics costs every process of a run about half a second at start (2.5 s with scipy installed);
    the training command imports them only when the config has an evaluate phase."""
    import subprocess
    import sys

    probe = "import sys, dalle2_decoder.cli, dalle2_decoder.training; "
    probe += "print(sorted({'torchmetrics', 'scipy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_the_package_neither_requires_nor_imports_scipy():
    """torchmetrics imports scipy.signal whenever scipy is installed (about 2 s of a 2-core machine's
    start-up, in every process that builds a metric); no metric used here needs it, so it is no
    requirement and no module imports it. Kept off, an evaluating process starts that much sooner."""
    import re
    from importlib.metadata import requires

    required = {re.split(r"[\s;<>=!~\[(]", line, maxsplit=1)[0].lower() for line in requires(PACKAGE) or []}
    assert "torchmetrics" in required and "scipy" not in required
    importing = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            importing += [f"{path.relative_to(ROOT)}:{node.lineno}" for name in names if name.split(".")[0] == "scipy"]
    assert importing == []
