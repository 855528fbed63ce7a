"""bigmodel_cli's modules import each other without a cycle, counting the imports inside
functions too: a cycle hidden behind a deferred import is still a cycle (issue 28)."""

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parent.parent / "bigmodel_cli"


def module_names() -> Dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(path: Path, name: str, known: Set[str]) -> Set[str]:
    """The package's modules `path` imports anywhere in it (top level, functions, TYPE_CHECKING
    aside): `from a import b` counts as a.b where b is a module, else as a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []  # annotations only: never imported at run time
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {module for module in found if module in known and module != name}


def import_graph() -> Dict[str, Set[str]]:
    names = module_names()
    return {name: imported_modules(path, name, set(names)) for name, path in names.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
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


def test_the_graph_sees_deferred_imports():
    graph = import_graph()
    assert len(graph) > 100
    # cli.py imports run_lock inside a function only (so that --help stays torch-free)
    assert "bigmodel_cli.run_lock" in graph["bigmodel_cli.cli"]


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_imports_without_a_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (deferred imports included):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_a_command_is_imported_by_the_cli_alone():
    """Commands share code through the modules below them, never through each other: each
    command's module is imported by no other module (the CLI imports it by its name in
    command_table.py)."""
    graph = import_graph()
    commands = {name for name in graph if name.startswith("bigmodel_cli.commands.")}
    importers = {name: sorted(importer for importer, targets in graph.items() if name in targets)
                 for name in commands}
    assert {name: found for name, found in importers.items() if found} == {}
