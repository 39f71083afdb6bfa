"""Keys a config sets that change nothing are warned about, at their own lines (checks.no_effect)."""

from __future__ import annotations

from pathlib import Path

import pytest

from upgraderd.config import schema

HEAD = "listeners:\n  - {name: web, host: 127.0.0.1, port: 8080}\nworkers:\n"


@pytest.mark.parametrize("body,warnings", [
    ("  app: 'mymod:make'\n  prefork: false\n",
     ["u.yaml:5:12: workers.prefork: false has no effect: a `module:factory` app is always forked "
      "from its generation's template"]),
    ("  app: echo\n  warm: true\n",
     ["u.yaml:5:9: workers.warm: true has no effect without prefork: the standby is a template "
      "started ahead of the next generation (set prefork: true, or use a `module:factory` app)"]),
    ("  command: [/bin/true]\n  warm: true\n", ["u.yaml:5:9: workers.warm: true has no effect"]),
    ("  app: 'mymod:make'\n  prefork: false\n  warm: true\n", ["u.yaml:5:12: workers.prefork: false"]),
    ("  app: echo\n  prefork: true\n  warm: true\n", []),
    ("  app: 'mymod:make'\n  warm: true\n", []),
    ("  app: echo\n  prefork: false\n  warm: false\n", []),
])
def test_keys_that_change_nothing_are_warned_at_their_line(tmp_path: Path, body: str,
                                                          warnings: list[str]) -> None:
    (tmp_path / "mymod.py").write_text("def make(): pass\n")
    cfg = schema.parse(HEAD + body + f"  cwd: {tmp_path}\n", "u.yaml")
    assert len(cfg.warnings) == len(warnings), cfg.warnings
    for got, want in zip(cfg.warnings, warnings):
        assert got.startswith(want), (got, want)
