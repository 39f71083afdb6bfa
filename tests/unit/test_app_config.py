"""`workers.app` as `package.module:factory`, and `workers.prefork`/`warm`: located errors."""

from __future__ import annotations

import pytest

from upgraderd.config import schema
from upgraderd.errors import ConfigError

HEAD = "listeners:\n  - {name: web, port: 8080}\nworkers:\n"


@pytest.mark.parametrize("body, where, phrase", [
    ("  app: 'bad-name:make'\n", "4:8: workers.app", "is not `package.module:factory`"),
    ("  app: 'pkg.mod:'\n", "4:8: workers.app", "is not `package.module:factory`"),
    ("  app: ecoh\n", "4:8: workers.app", "did you mean 'echo'"),
    ("  app: 'nosuchmodule_x1.server:make'\n", "4:8: workers.app", "module 'nosuchmodule_x1' not found"),
    ("  app: 'mypkg.nothere:make'\n", "4:8: workers.app", "module 'mypkg.nothere' not found"),
    ("  app: 'plain.sub:make'\n", "4:8: workers.app", "'plain' is a module, not a package"),
    ("  app: echo\n  prefork: 'yes'\n", "5:12: workers.prefork", "expected true or false"),
])
def test_bad_app_is_located(tmp_path, body, where, phrase):
    (tmp_path / "mypkg").mkdir()
    # A package whose __init__ would fail if the check imported it.
    (tmp_path / "mypkg" / "__init__.py").write_text("raise SystemExit('imported!')\n")
    (tmp_path / "plain.py").write_text("")
    path = tmp_path / "u.yaml"
    path.write_text(HEAD + body + f"  cwd: {tmp_path}\n")
    with pytest.raises(ConfigError) as e:
        schema.load(str(path))
    assert e.value.problems[0].startswith(f"{path}:{where}: "), e.value.problems
    assert phrase in e.value.problems[0]


def test_a_findable_factory_loads_without_being_imported(tmp_path):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("raise SystemExit('imported!')\n")
    (tmp_path / "mypkg" / "server.py").write_text("raise SystemExit('imported!')\n")
    path = tmp_path / "u.yaml"
    path.write_text(HEAD + f"  app: 'mypkg.server:make'\n  cwd: {tmp_path}\n")
    cfg = schema.load(str(path))
    assert cfg.prefork and cfg.worker_argv[-2:] == ("upgraderd.apps.template", "mypkg.server:make")
    path.write_text(HEAD + "  app: echo\n")
    assert not schema.load(str(path)).prefork
