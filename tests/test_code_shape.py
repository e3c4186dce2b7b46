"""Modules a person reads in one sitting: no module of the package over 500 lines, no function over
80, but the U-Net and Decoder constructors, whose signatures mirror DALLE2-pytorch's."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dalle2_decoder"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# (module relative to the package, qualified name): the reference's constructor signatures.
LONG_ALLOWED = {("models/unet.py", "Unet.__init__"), ("models/decoder.py", "Decoder.__init__")}


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def long_functions(path: Path, limit: int):
    """(qualified name, lines) of every function in `path` longer than `limit` lines."""
    found = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = child.end_lineno - child.lineno + 1
                    if lines > limit:
                        found.append((name, lines))
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(ast.parse(path.read_text()), "")
    return found


def test_no_module_of_the_package_is_over_500_lines():
    over = {
        str(p.relative_to(PACKAGE)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert over == {}


def test_no_function_is_over_80_lines_but_the_reference_constructors():
    over = {
        (str(p.relative_to(PACKAGE)), name): lines
        for p in modules()
        for name, lines in long_functions(p, MAX_FUNCTION_LINES)
    }
    assert set(over) <= LONG_ALLOWED, {k: v for k, v in over.items() if k not in LONG_ALLOWED}


@pytest.mark.parametrize("limit, expected", [(2, {"outer", "Holder.method"}), (3, {"outer"}), (4, set())])
def test_the_counter_sees_functions_and_methods_by_their_whole_length(tmp_path, limit, expected):
    source = tmp_path / "m.py"
    # outer: 4 lines; Holder.method: 3 lines.
    source.write_text(
        "def outer():\n    a = 1\n    b = 2\n    return a + b\n\n"
        "class Holder:\n    def method(self):\n        x = 1\n        return x\n"
    )
    assert {name for name, _ in long_functions(source, limit)} == expected
