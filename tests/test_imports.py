"""No import circles among the product's modules (``agent``, ``engines``, ``schemas``).

Two checks. A static one reads every ``import`` statement of every module (at the top, inside
functions and under ``if TYPE_CHECKING:`` alike: a lazy import still ties two modules
together) and looks for a circle in the graph of which module imports which; a failure names
each circle with the file and line of every import in it. A dynamic one imports every module
in a fresh interpreter, in name order and in the reverse order, so that a module that only
imports when something else was imported first shows up too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.fixtures.paths import REPO

PACKAGES = ("agent", "engines", "schemas")


def product_modules() -> dict[str, Path]:
    """Every module of the product: dotted name -> file (a package is its ``__init__.py``)."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imported_names(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """(dotted name, line) of everything ``module`` imports; for ``from X import y`` both
    ``X.y`` (a submodule, if it is one) and ``X``."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[:len(package) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno
            yield base, node.lineno


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {product module it imports: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for name, line in _imported_names(module, path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.setdefault(name, line)
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_static_analysis_sees_a_circle() -> None:
    graph = {"a": {"b": 3}, "b": {"c": 7}, "c": {"a": 1}, "d": {"a": 2}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_circle_among_product_modules() -> None:
    modules = product_modules()
    graph = import_graph(modules)
    assert len(modules) > 100 and "agent.bus.interface" in graph["agent.bus.embedded"]
    report = []
    for component in circles(graph):
        members = set(component)
        report.append("circle: " + ", ".join(component))
        report += [f"  {modules[m].relative_to(REPO)}:{line} imports {target}"
                   for m in component for target, line in sorted(graph[m].items())
                   if target in members]
    assert not report, "\n".join(report)


def test_every_module_imports_in_a_fresh_interpreter_in_either_order() -> None:
    names = sorted(product_modules())
    for order in (names, names[::-1]):
        code = ("import importlib, sys\n"
                "for name in sys.argv[1:]:\n"
                "    importlib.import_module(name)\n")
        proc = subprocess.run([sys.executable, "-c", code, *order], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
