"""
The import layering the README's "Layout" section promises, read from the source with C{ast}:
no import cycle under netsvc/ (imports at module level, including those under C{if TYPE_CHECKING:};
imports inside functions are deliberate late bindings and are not counted), and the shared
modules at the bottom import nothing above them (not even lazily).
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "netsvc"


def moduleName(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {moduleName(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, lazy: bool) -> set[str]:
    """The netsvc modules C{path} imports: at module level, or (C{lazy}) anywhere in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = moduleName(path) if path.name == "__init__.py" else moduleName(path).rpartition(".")[0]
    if lazy:
        nodes = list(ast.walk(tree))
    else:
        nodes = []
        pending = list(tree.body)
        while pending:
            node = pending.pop()
            nodes.append(node)
            if isinstance(node, (ast.If, ast.Try)):
                pending += node.body + node.orelse + getattr(node, "finalbody", [])
                for handler in getattr(node, "handlers", []):
                    pending += handler.body
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.update(f"{base}.{a.name}" for a in node.names)  # a module, or a name in module base
    return {n for n in found if n == "netsvc" or n.startswith("netsvc.")}


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module C{name} stands for (an imported attribute stands for its module)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    onStack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        onStack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    onStack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in onStack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    onStack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def graph(lazy: bool) -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = {resolve(n, known) for n in imports(path, lazy)}
        # A package importing its own submodules (re-exports) is not an arrow back up.
        edges[name] = {t for t in targets if t and t != name and not t.startswith(name + ".")}
    return edges


#: The bottom of the layering, and what each may import from netsvc (even inside a function).
#: (What config.py, above them, imports is kept honest by the cycle test: nothing it imports may import it.)
BOTTOM = {
    "netsvc.schema": set(),
    "netsvc.rates": set(),
    "netsvc.metrics": set(),
    "netsvc.logs": set(),
    "netsvc.registry": set(),
    "netsvc.tls": {"netsvc.tls.*"},
    "netsvc.endpoints": {"netsvc.schema", "netsvc.tls"},
    "netsvc.policies": {"netsvc.schema", "netsvc.rates", "netsvc.metrics"},
}


class LayoutTests(unittest.TestCase):
    def test_cyclesFinderFindsOne(self):
        self.assertEqual(cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}), [["a", "b", "c"]])
        self.assertEqual(cycles({"a": {"b"}, "b": set()}), [])

    def test_noImportCycle(self):
        self.assertEqual(cycles(graph(lazy=False)), [])

    def test_sharedModulesImportOnlyBelowThem(self):
        edges = graph(lazy=True)
        for name, allowed in BOTTOM.items():
            for target in edges[name]:
                ok = target in allowed or any(
                    a.endswith(".*") and target.startswith(a[:-1]) for a in allowed)
                self.assertTrue(ok, f"{name} imports {target}, above it in the README's Layout")
        for sub in [m for m in edges if m.startswith("netsvc.tls.")]:
            self.assertEqual({t for t in edges[sub] if not t.startswith("netsvc.tls")}, set(), sub)
