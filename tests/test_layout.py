"""The code's shape (issue 21): no file in ``distlocal/`` over 500 lines, no function over 60, no
import circle between its modules at import time, and one step: ``cross_entropy`` is called by the
training step and by evaluation only."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PKG = REPO / "distlocal"


def _modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _import_time_edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports while it is being imported: its module-level imports,
    outside ``if TYPE_CHECKING:`` (function-level imports run later, and cannot make a circle)."""
    edges: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        edges |= {t for t in targets if t in modules and t != name}
    return edges


def test_no_file_over_500_lines_and_no_function_over_60() -> None:
    long_files = {str(p.relative_to(REPO)): n for p in PKG.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > 500}
    long_functions = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > 60:
                    long_functions.append(f"{path.relative_to(REPO)}:{node.name} ({n} lines)")
    assert not long_files and not long_functions, (long_files, long_functions)


def test_no_import_circle() -> None:
    modules = _modules()
    graph = {m: _import_time_edges(m, p, modules) for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                circles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, circles
    # The check sees real edges: the trainer imports the step at import time.
    assert "distlocal.step" in graph["distlocal.trainer"]


def test_cross_entropy_is_the_steps_and_evaluations_only() -> None:
    calls = []
    for path in [*PKG.rglob("*.py"), *(REPO / "profiling").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("cross_entropy"):
                calls.append(str(path.relative_to(REPO)))
    assert sorted(calls) == ["distlocal/step.py", "distlocal/trainer.py"], calls
