"""The core's state has owners: drawn from the source, as test_layers.py draws the layers.

- (No import cycle among the core's modules, `TYPE_CHECKING` imports included,
  is checked in test_layers.py.)
- Only core/master.py knows `Master`: no other module imports it, and no
  function outside it takes one as a parameter; the loop (system/posix.py)
  and the service see the master through the `Loop` seam.
- No `Any` in the core (the seams included): every value has a type.
- Each counter of core/stats.py is written only by its `Tally`: no module
  outside stats.py increments a `stats.` field.
"""

from __future__ import annotations

import ast
import re

from tests.unit.test_layers import MODULES

CORE = {name: path for name, path in MODULES.items() if name.startswith("upgraderd.core.")}


def test_only_the_master_module_knows_the_master() -> None:
    importers, takers = [], []
    for name, path in MODULES.items():
        if name == "upgraderd.core.master":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and any(a.name == "Master" for a in node.names):
                importers.append(name)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
                if any(a.annotation is not None and re.search(r"\bMaster\b", ast.unparse(a.annotation))
                       for a in args):
                    takers.append(f"{name}.{node.name}")
    assert (importers, takers) == ([], [])


def test_the_core_and_its_seams_use_no_any() -> None:
    as_type = re.compile(r"\bimport\b.*\bAny\b|[:\[,(]\s*Any\b|->\s*Any\b")
    found = [f"{path.name}:{n}" for path in CORE.values()
             for n, line in enumerate(path.read_text().splitlines(), 1) if as_type.search(line.split("#")[0])]
    assert found == []


def test_only_the_tally_writes_the_counters() -> None:
    writes = re.compile(r"\bstats\.\w+(\[[^]]*\])?\s*(\+=|=(?!=))")
    found = [f"{name}:{n}" for name, path in MODULES.items() if name != "upgraderd.core.stats"
             for n, line in enumerate(path.read_text().splitlines(), 1) if writes.search(line)]
    assert found == []
