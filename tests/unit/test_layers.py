"""The package's structure, drawn from its imports: layers, no cycles, module sizes.

The rules are the ones each package's `__init__` docstring states. Imports
inside `if TYPE_CHECKING:` blocks are for annotations only and are not
counted; imports inside functions are (they run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import ROOT

PKG = ROOT / "upgraderd"
# What the core must never import: every effect goes through core/seams.py.
OS_MODULES = {"os", "socket", "select", "selectors", "subprocess", "shutil", "pwd", "grp", "fcntl",
              "ctypes", "mmap", "threading", "multiprocessing"}
FORBIDDEN = {
    "core": {"upgraderd.system", "upgraderd.service", "upgraderd.metrics", "upgraderd.apps", "upgraderd.worker"},
    "config": {"upgraderd.core", "upgraderd.system", "upgraderd.service", "upgraderd.metrics", "upgraderd.apps"},
    "system": {"upgraderd.service", "upgraderd.metrics", "upgraderd.apps"},
    "metrics": {"upgraderd.service", "upgraderd.apps"},
    "worker": {"upgraderd.core", "upgraderd.service", "upgraderd.metrics"},
    "apps": {"upgraderd.core", "upgraderd.service", "upgraderd.metrics"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """Return the modules `path` imports at run time (not under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}
GRAPH = {name: {m for m in runtime_imports(p) if m in MODULES and m != name} for name, p in MODULES.items()}


def test_there_is_no_import_cycle() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep)
        stack.pop()
        state[name] = 2

    # Package __init__ modules import nothing of their own, so a cycle through
    # one would be an artefact of `from pkg import mod`: skip the package nodes.
    for name in MODULES:
        if name not in state:
            walk(name)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_each_package_imports_only_what_its_layer_allows(package: str) -> None:
    bad = []
    for name, path in MODULES.items():
        if not name.startswith(f"upgraderd.{package}"):
            continue
        for imported in runtime_imports(path):
            if any(imported == f or imported.startswith(f + ".") for f in FORBIDDEN[package]):
                bad.append(f"{name} imports {imported}")
            if package == "core" and imported.split(".")[0] in OS_MODULES:
                bad.append(f"{name} imports {imported} (the core reaches the OS only through core/seams.py)")
    assert bad == []


def test_modules_stay_small_and_the_master_only_decides() -> None:
    sizes = {name: len(p.read_text().splitlines()) for name, p in MODULES.items()}
    assert {n: s for n, s in sizes.items() if s > 400} == {}
    assert sizes["upgraderd.core.master"] <= 300
    own = {m for m in runtime_imports(MODULES["upgraderd.core.master"]) if m.startswith("upgraderd")}
    # `from upgraderd.core import launcher` names the package too; count the modules only.
    modules = {m for m in own if m in MODULES and MODULES[m].name != "__init__.py"}
    assert len(modules) <= 10, sorted(modules)
