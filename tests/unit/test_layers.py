"""The package's structure, drawn from its imports: layers, no cycles, module sizes.

The rules are the ones each package's `__init__` docstring states. Imports
inside functions count (they run). Imports inside `if TYPE_CHECKING:` blocks
run only under mypy: the run-time checks leave them out, while the stricter
checks (the layers of worker/, apps/ and contract/, the cycles inside core/,
apps/, worker/ and contract/, and the cycles between packages) count them,
since an annotation-only import still ties two modules' designs together.
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
    # The worker side imports nothing of the master's: only the contract (and, for
    # apps/, the worker library).
    "worker": {"upgraderd.core", "upgraderd.service", "upgraderd.metrics", "upgraderd.system",
               "upgraderd.config", "upgraderd.apps", "upgraderd.errors"},
    "apps": {"upgraderd.core", "upgraderd.service", "upgraderd.metrics", "upgraderd.system",
             "upgraderd.config", "upgraderd.errors"},
    # Both sides import the contract, so it imports nothing of the project.
    "contract": {"upgraderd.core", "upgraderd.config", "upgraderd.system", "upgraderd.service",
                 "upgraderd.metrics", "upgraderd.apps", "upgraderd.worker", "upgraderd.errors"},
}
# Packages whose layer rule counts TYPE_CHECKING imports too.
STRICT = {"worker", "apps", "contract"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path, typing_too: bool = False) -> set[str]:
    """Return the modules `path` imports at run time (with `typing_too`, also under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if not typing_too and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
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
# Every import, TYPE_CHECKING ones included.
FULL_GRAPH = {name: {m for m in runtime_imports(p, typing_too=True) if m in MODULES and m != name}
              for name, p in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Return one cycle of `graph` (its nodes, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = walk(dep)
                if found is not None:
                    return found
        stack.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            found = walk(name)
            if found is not None:
                return found
    return None


def within(package: str) -> dict[str, set[str]]:
    """Return the full import graph restricted to the modules of `package`."""
    inside = {n for n in MODULES if n == f"upgraderd.{package}" or n.startswith(f"upgraderd.{package}.")}
    return {n: FULL_GRAPH[n] & inside for n in inside}


def package_of(module: str) -> str:
    """Return the top-level part of the package `module` is in (`upgraderd.system.posix` -> `system`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_there_is_no_import_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("package", ["apps", "worker", "contract"])
def test_no_cycle_inside_the_worker_side_even_through_type_checking_imports(package: str) -> None:
    cycle = find_cycle(within(package))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_cycle_inside_the_core_even_through_type_checking_imports() -> None:
    # The core's own half of the rule (issue 21): no module imports `Master` back,
    # not even for annotations (tests/unit/test_owners.py), and no two modules
    # import each other.
    cycle = find_cycle(within("core"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_cycle_between_packages() -> None:
    # One edge per package that imports another (TYPE_CHECKING imports included);
    # the top-level modules (upgraderd.errors, upgraderd.__main__) count as packages.
    packages: dict[str, set[str]] = {}
    for name, deps in FULL_GRAPH.items():
        mine = package_of(name)
        packages.setdefault(mine, set()).update(package_of(d) for d in deps if package_of(d) != mine)
    cycle = find_cycle(packages)
    assert cycle is None, "package cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_each_package_imports_only_what_its_layer_allows(package: str) -> None:
    bad = []
    for name, path in MODULES.items():
        if not name.startswith(f"upgraderd.{package}"):
            continue
        for imported in runtime_imports(path, typing_too=package in STRICT):
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
