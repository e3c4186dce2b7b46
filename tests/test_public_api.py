"""The README's "Public API" section is the package's stable surface: every name it lists imports
from the module its heading names, and each module's `__all__` is exactly that list."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dalle2_decoder"


def readme_api() -> Dict[str, List[str]]:
    """module -> the names its table lists, in order, from README.md's "## Public API" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Public API\n", 1)[1].split("\n## ", 1)[0]
    listed: Dict[str, List[str]] = {}
    module = None
    for line in section.splitlines():
        heading = re.fullmatch(r"### `([\w.]+)`", line)
        if heading:
            module = heading.group(1)
            listed[module] = []
            continue
        row = re.match(r"\| `(\w+)` \|", line)
        if row and module is not None:
            listed[module].append(row.group(1))
    return listed


def packages() -> List[str]:
    return sorted(".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / PACKAGE).rglob("__init__.py"))


def test_the_readme_lists_a_table_for_the_package_and_its_subpackages():
    listed = readme_api()
    assert PACKAGE in listed and all(names for names in listed.values())
    assert set(listed) <= set(packages()), "a heading names no package"


@pytest.mark.parametrize("module", sorted(readme_api()))
def test_every_listed_name_imports_from_where_the_readme_says(module):
    names = readme_api()[module]
    imported = importlib.import_module(module)
    for name in names:
        namespace: dict = {}
        exec(f"from {module} import {name}", namespace)  # the statement a user writes
        assert namespace[name] is getattr(imported, name), f"{module}.{name}"


@pytest.mark.parametrize("module", packages())
def test_each_packages_all_is_the_readme_list(module):
    """A package the README does not list must export nothing (`__all__ = []`)."""
    exported = importlib.import_module(module).__dict__.get("__all__")
    assert isinstance(exported, list), f"{module} declares no __all__"
    assert len(set(exported)) == len(exported), f"{module}.__all__ repeats a name"
    assert exported == readme_api().get(module, []), f"README.md's table for {module} differs from its __all__"
