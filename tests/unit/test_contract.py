"""The master<->worker contract has one home: upgraderd/contract/, and it is documented.

Each name both sides must agree on is spelled once, in the contract, and every
one is in docs/workers.md's table; a literal `UPGRADERD_*` name anywhere else in
the package's code would be a second home that can drift.
"""

from __future__ import annotations

import ast
import re

from tests.support import ROOT
from upgraderd.contract import env, notify, wire

PKG = ROOT / "upgraderd"
# The master's own variables, not the workers': the operator's config path, the USR2 hand-over fd.
MASTER_OWN = {"UPGRADERD_CONFIG", "UPGRADERD_REEXEC_FD"}


def contract_names() -> set[str]:
    return {v for k, v in vars(env).items() if k.isupper() and isinstance(v, str) and v.startswith("UPGRADERD_")}


def test_every_upgraderd_variable_of_the_contract_is_documented_for_workers():
    documented = set(re.findall(r"`(UPGRADERD_[A-Z_]+?)(?:<NAME>)?`", (ROOT / "docs/workers.md").read_text()))
    names = {n.rstrip("_") if n == env.ADDR_PREFIX else n for n in contract_names()}
    assert names - documented - {"UPGRADERD_ADDR"} == set()
    assert "UPGRADERD_ADDR_" in (ROOT / "docs/workers.md").read_text()


def test_no_upgraderd_variable_is_spelled_outside_the_contract():
    found = []
    for path in PKG.rglob("*.py"):
        if path.parent.name == "contract":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and not _prose(node):
                for name in re.findall(r"\bUPGRADERD_[A-Z_]+", node.value):
                    if name not in MASTER_OWN:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert found == []


def _prose(node: ast.Constant) -> bool:
    # A literal that is a whole line of prose (a docstring or a message) names the
    # variable for a reader; only a short literal is used as the name itself.
    return " " in node.value


def test_the_messages_and_the_channel_name_round_trip():
    assert notify.ready() == "READY=1"
    assert notify.ready("serving") == "READY=1\nSTATUS=serving"
    assert notify.spawned(3, 4242) == "SPAWNED=3:4242"
    name = wire.channel_name(17, 7, 2)
    assert name == "upgraderd-17-handoff-7-2" and wire.address(name) == b"\0" + name.encode()
    assert wire.parse_name(name, 17) == wire.Channel(7, 2, name)
    assert wire.parse_name(name, 18) is None
    assert wire.parse_name("upgraderd-17-handoff-\u00b2-1", 17) is None   # a digit int() refuses


def test_small_numbers_from_an_untrusted_environment():
    assert env.small_number("42") == 42
    for bad in (None, "", "-1", "1e3", "\u00b2", "1234567890"):
        assert env.small_number(bad) is None
