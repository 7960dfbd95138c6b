"""
The shape of the code, checked from its source: no import cycle between rproxy's modules at run time
(imports inside functions included, only C{if TYPE_CHECKING:} blocks left out), and package
C{__init__} modules that import nothing, so that importing one module never drags in its siblings.
"""

from __future__ import annotations

import ast
import os

from twisted.trial import unittest

import rproxy

PACKAGE = os.path.dirname(os.path.abspath(rproxy.__file__))


def modules() -> dict[str, str]:
    """Every module of rproxy but its tests, by dotted name, and its file."""
    found = {}
    for directory, subdirectories, files in os.walk(PACKAGE):
        subdirectories[:] = [d for d in subdirectories if d not in ("test", "__pycache__")]
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(directory, file)
                relative = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                found[relative.removesuffix(".__init__")] = path
    return found


def _typeCheckingOnly(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtimeImports(path: str, known: set[str]) -> set[str]:
    """The rproxy modules the file at C{path} imports when it runs (anywhere but under TYPE_CHECKING)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    imported: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _typeCheckingOnly(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in imported if name in known}


def withParents(name: str) -> list[str]:
    """C{name} and the packages importing it runs first (C{a.b.c}: C{a}, C{a.b}, C{a.b.c})."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    onStack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        onStack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in onStack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                onStack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


class LayoutTests(unittest.TestCase):
    def test_noImportCycle(self) -> None:
        """No module imports, at run time, one that imports it back (directly or through others)."""
        known = modules()
        graph = {}
        for name, path in known.items():
            targets = set()
            for imported in runtimeImports(path, set(known)):
                targets.update(parent for parent in withParents(imported) if parent != name)
            # A module's own packages run before it, so their imports are its imports too (but for a module
            # that imports nothing of rproxy, like _version, which no package import can come back to).
            if targets:
                targets.update(parent for parent in withParents(name)[:-1])
            graph[name] = targets
        self.assertEqual(cycles(graph), [])

    def test_packageInitsImportNothing(self) -> None:
        """Package C{__init__} modules hold a docstring (the top-level one imports lazily, its version aside)."""
        known = modules()
        for name, path in known.items():
            if not path.endswith("__init__.py"):
                continue
            imported = runtimeImports(path, set(known))
            allowed = {"rproxy._version"} if name == "rproxy" else set()
            self.assertEqual(imported - allowed, set(), f"{name} imports {sorted(imported)}")

    def test_cycleFinder(self) -> None:
        """The check above can fail: a cycle through three modules is found, a chain is not."""
        self.assertEqual(cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}), [["a", "b", "c"]])
        self.assertEqual(cycles({"a": {"b"}, "b": {"c"}, "c": set()}), [])
