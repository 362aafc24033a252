"""The package's import graph: layers that import only downward, no cycle, no function-local import of jaxalgo.

Read from the source with :mod:`ast` (nothing is imported), so a violation is reported with its file and line.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxalgo"

# Each unit (a top-level module or subpackage of jaxalgo) may import units of its own layer or lower ones only.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("options",),
    ("losses", "data", "checkpoint", "workdir", "optimizers", "tensorboard_log"),
    ("models",),
    ("grads", "experiments"),
    ("runner",),
    ("lowrank",),
    ("parallel",),
    ("config",),
    ("train", "plot"),
    ("sweep",),
    ("cli", "__main__"),
)
LAYER_OF = {unit: index for index, units in enumerate(LAYERS) for unit in units}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(node: ast.ImportFrom | ast.Import) -> list[str]:
    """The jaxalgo modules an import statement loads (``from pkg import mod`` is the module ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "jaxalgo"]
    if node.level or not node.module or node.module.split(".")[0] != "jaxalgo":
        return []
    return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names]


def _imports(path: pathlib.Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``(module-level imports, imports inside functions or classes)`` as ``(module, line)``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = [
        (m, node.lineno) for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom) for m in _resolve(node)
    ]
    nested = [
        (m, node.lineno)
        for outer in tree.body
        if not isinstance(outer, ast.Import | ast.ImportFrom)
        for node in ast.walk(outer)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for m in _resolve(node)
    ]
    return top, nested


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in MODULES} - {None}
    assert units <= set(LAYER_OF), f"units without a layer: {sorted(units - set(LAYER_OF))}"


def test_no_function_local_import_of_jaxalgo():
    found = [
        f"{MODULES[m].name}:{line} imports {target}" for m, (_, nested) in GRAPH.items() for target, line in nested
    ]
    assert not found, "function-local imports:\n" + "\n".join(found)


def test_imports_go_only_downward():
    upward = []
    for module, (top, _) in GRAPH.items():
        unit = _unit(module)
        if unit is None:
            continue  # jaxalgo/__init__.py re-exports everything
        for target, line in top:
            other = _unit(target)
            if other is not None and LAYER_OF[other] > LAYER_OF[unit]:
                upward.append(
                    f"{module}:{line} ({unit}, layer {LAYER_OF[unit]}) imports {target} (layer {LAYER_OF[other]})"
                )
    assert not upward, "upward imports:\n" + "\n".join(upward)


def _cycles() -> list[list[str]]:
    edges = {m: sorted({t for t, _ in top if t in MODULES and t != m}) for m, (top, _) in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    return cycles


def test_no_import_cycle():
    cycles = _cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("source", ["import jaxalgo.train\n", "from jaxalgo.grads import _combine\n"])
def test_the_walk_sees_imports(source, tmp_path):
    # the oracle of the checks above: an import at module level is found, and one inside a function is nested
    tree_top = ast.parse(source)
    tree_nested = ast.parse("def f():\n    " + source)
    assert [m for node in tree_top.body for m in _resolve(node)]
    assert not [m for node in tree_nested.body if isinstance(node, ast.Import | ast.ImportFrom) for m in _resolve(node)]
