"""The shape of the code the architecture asks for, checked from the sources (ARCHITECTURE.md).

Imports are read with ``ast`` (only those that run: ``if TYPE_CHECKING:`` blocks are type
hints, not dependencies), so a new import that closes a circle or crosses a layer fails here.
"""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

from twisted.trial.unittest import SynchronousTestCase

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rmilter")


def _module_name(path: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[: -len(".py")]
    parts = relative.split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST, module: str, is_package: bool, known: Set[str]) -> Set[str]:
    """rmilter modules imported when ``module`` is imported or its functions run."""
    found: Set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = package + ("." + base if base else "")
            for alias in node.names:
                submodule = base + "." + alias.name
                if submodule in known:  # "from rmilter.checks import spam": the module spam
                    found.add(submodule)
                else:  # a name defined in the package (or module) itself
                    found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name in known}


def import_graph() -> Dict[str, Set[str]]:
    paths: Dict[str, str] = {}
    for root, _dirs, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                paths[_module_name(path)] = path
    known = set(paths)
    graph: Dict[str, Set[str]] = {}
    for module, path in paths.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        graph[module] = _runtime_imports(tree, module, path.endswith("__init__.py"), known) - {module}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle as a path of modules, or [] when there is none."""
    state: Dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: List[str] = []

    def visit(module: str) -> List[str]:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[module] = 2
        return []

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return []


class ImportTests(SynchronousTestCase):
    def test_graph_is_read(self) -> None:
        """The walk sees the package (so the checks below are not vacuous)."""
        graph = import_graph()
        self.assertIn("rmilter.pipeline", graph)
        self.assertIn("rmilter.checks.spam", graph["rmilter.pipeline"])
        self.assertIn("rmilter.deps", graph["rmilter.checks.spam"])

    def test_no_import_cycle(self) -> None:
        self.assertEqual(find_cycle(import_graph()), [])

    def test_cycle_finder_finds_one(self) -> None:
        self.assertEqual(find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}), ["a", "b", "c", "a"])

    def test_checks_know_neither_the_milter_nor_the_runtime(self) -> None:
        """A check gets the message and its dependencies; the wire format and the runtime's
        lifetime are not its business."""
        for module, imports in import_graph().items():
            if module.startswith("rmilter.checks"):
                forbidden = {i for i in imports if i.startswith("rmilter.milter") or i == "rmilter.runtime"}
                self.assertEqual(forbidden, set(), module)

    def test_codec_imports_only_the_milter_package(self) -> None:
        imports = import_graph()["rmilter.milter.codec"]
        self.assertEqual({i for i in imports if not i.startswith("rmilter.milter")}, set())

    def test_configuration_is_pure(self) -> None:
        """The configuration package reads files, never keys, backends or the service."""
        for module, imports in import_graph().items():
            if module.startswith("rmilter.config"):
                outside = {i for i in imports if not i.startswith("rmilter.config") and i != "rmilter.netlist"}
                self.assertEqual(outside, set(), module)
