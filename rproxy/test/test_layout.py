"""
The shape of the code, checked from its source: no import cycle between rproxy's modules at run time
(imports inside functions included, only C{if TYPE_CHECKING:} blocks left out); package C{__init__}
modules that import nothing, so that importing one module never drags in its siblings; and no private
name of Twisted or h2 outside the one module made for them.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterable

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


#: The one module allowed private names of the libraries rproxy builds on (see L{PrivateNameTests}).
PRIVATE_MODULE = "rproxy.app.reactor"
#: The libraries whose private names pin rproxy to one release.
_LIBRARIES = ("twisted", "h2", "hpack", "hyperframe", "priority")
_MANGLED = re.compile(r"^_[A-Za-z]\w*__\w+$")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def ownPrivateNames(paths: Iterable[str]) -> set[str]:
    """The private names rproxy's own code defines: functions, classes, arguments, attributes it assigns."""
    own = set()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(node.name)
            elif isinstance(node, ast.arg):
                own.add(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
    return {name for name in own if _private(name)}


def foreignPrivateNames(path: str, own: set[str]) -> set[str]:
    """The private names of Twisted, h2 and their kin that the file at C{path} uses (see L{PrivateNameTests})."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()

    def library(module: str) -> bool:
        return module.split(".")[0] in _LIBRARIES

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and library(node.module):
            if any(_private(part) for part in node.module.split(".")):
                found.add(node.module)
            for alias in node.names:
                if _private(alias.name):
                    found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if library(alias.name) and any(_private(part) for part in alias.name.split(".")):
                    found.add(alias.name)
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            if _MANGLED.match(node.attr) or node.attr not in own:
                found.add(node.attr)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
            and node.args[1].value not in own
        ):
            found.add(node.args[1].value)
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


class PrivateNameTests(unittest.TestCase):
    """
    No module of rproxy uses a private name of Twisted, h2, hpack, hyperframe or priority (a name that pins
    it to one release), but L{PRIVATE_MODULE}, which lists each use and why, and which
    L{rproxy.test.test_twisted_contract} covers.

    A private name is found by looking: C{from twisted.x import _y}, a module path with a C{_} part, a
    name-mangled C{_Class__name}, and any C{thing._name} (or C{getattr(thing, "_name")}) whose C{_name} is
    not one rproxy defines itself, which can only be someone else's.
    """

    def test_none(self) -> None:
        known = modules()
        own = ownPrivateNames(known.values())
        found = {}
        for name, path in known.items():
            if name == PRIVATE_MODULE:
                continue
            uses = foreignPrivateNames(path, own)
            if uses:
                found[name] = sorted(uses)
        self.assertEqual(found, {})

    def test_finder(self) -> None:
        """The check above can fail: each kind of use is found, rproxy's own private names are not."""
        source = (
            "from twisted.web._http2 import H2Connection\n"
            "from twisted.web import _newclient\n"
            "import twisted.internet._sslverify\n"
            "from h2.connection import _decode_headers\n"
            "x = channel._HTTPChannel__first_line\n"
            "y = transport._tempDataBuffer\n"
            "z = getattr(request, '_disconnected', None)\n"
            "self._mine = 1\n"
            "w = other._mine\n"
        )
        path = self.mktemp() + ".py"
        with open(path, "w") as f:
            f.write(source)
        self.assertEqual(
            sorted(foreignPrivateNames(path, {"_mine"})),
            sorted(
                [
                    "twisted.web._http2",
                    "twisted.web._newclient",
                    "twisted.internet._sslverify",
                    "h2.connection._decode_headers",
                    "_HTTPChannel__first_line",
                    "_tempDataBuffer",
                    "_disconnected",
                ]
            ),
        )
