"""A user's `module:factory` app that cannot load: `check --deep` finds it, `reload` says why.

`upgraderd check` finds the module without importing it; `--deep` imports it
in a child as the template will and names the error at the `app:` key. A
generation whose template cannot load the app fails, and `upgraderd reload`
prints the exception's last line, which the template sends the master.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.e2e.test_cli import upgraderd
from tests.support.upgraderd_proc import Daemon, echo_config, free_port

pytestmark = pytest.mark.e2e

APP = '''
from upgraderd import worker
from upgraderd.apps import server


class Echo:
    def received(self, data):
        return data
    def closing(self):
        return False
    def idle(self):
        return True
    def drain(self):
        pass


def make():
    return server.Server(worker.listeners(), lambda name: Echo())
'''


def app_config(port: int, where: Path, app: str) -> dict[str, object]:
    return echo_config(port, count=1, workers={"count": 1, "app": app, "cwd": str(where)})


def write(path: Path, cfg: dict[str, object]) -> None:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def app_line(path: Path) -> str:
    """Return `FILE:LINE:COLUMN` of the `app:` value in `path`."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("app:"):
            return f"{path}:{i}:{line.index('app:') + 6}"
    raise AssertionError(f"no app: in {path}")


def test_check_deep_names_a_misspelt_factory_at_the_app_key(tmp_path: Path) -> None:
    (tmp_path / "mymod.py").write_text(APP)
    (tmp_path / "broken.py").write_text("import json\nvalue = 1 / 0\n")
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(60)\n")
    cfg = tmp_path / "u.yaml"
    write(cfg, app_config(free_port(), tmp_path, "mymod:mkae"))
    plain = upgraderd("check", "-c", str(cfg))
    assert plain.returncode == 0 and "mymod:mkae not imported: --deep imports it" in plain.stdout, plain
    deep = upgraderd("check", "--deep", "-c", str(cfg))
    assert deep.returncode == 1, deep
    assert deep.stderr.splitlines() == [
        f"{app_line(cfg)}: workers.app: cannot import 'mymod:mkae': "
        "AttributeError: module 'mymod' has no attribute 'mkae'",
        f"{cfg}: 1 error(s)"]
    write(cfg, app_config(free_port(), tmp_path, "broken:make"))
    deep = upgraderd("check", "--deep", "-c", str(cfg))
    assert deep.returncode == 1 and deep.stderr.splitlines()[0] == (
        f"{app_line(cfg)}: workers.app: cannot import 'broken:make': ZeroDivisionError: division by zero")
    write(cfg, app_config(free_port(), tmp_path, "slow:make"))
    deep = upgraderd("check", "--deep", "--timeout", "1", "-c", str(cfg))
    assert deep.returncode == 1 and deep.stderr.splitlines()[0] == (
        f"{app_line(cfg)}: workers.app: importing 'slow:make' did not finish within 1s")
    write(cfg, app_config(free_port(), tmp_path, "mymod:make"))
    deep = upgraderd("check", "--deep", "-c", str(cfg))
    assert deep.returncode == 0 and deep.stdout == f"{cfg}: ok (1 listener(s), 1 worker(s))\n", deep


def test_reload_prints_why_the_template_could_not_load_the_app(tmp_path: Path) -> None:
    (tmp_path / "mymod.py").write_text(APP)
    port = free_port()
    with Daemon(tmp_path, app_config(port, tmp_path, "mymod:make")).start() as d:
        d.write_config(app_config(port, tmp_path, "mymod:mkae"))
        r = upgraderd("reload", "-c", str(d.config_path), "--pidfile", str(d.pidfile))
        assert r.returncode == 1, r
        assert "cannot load 'mymod:mkae': AttributeError: module 'mymod' has no attribute 'mkae'" \
            in r.stderr, r
        assert d.status()["generations"][0]["state"] == "ACTIVE"   # generation 1 still serves


def test_keys_that_change_nothing_are_warnings_at_check_and_at_reload(tmp_path: Path) -> None:
    (tmp_path / "mymod.py").write_text(APP)
    port = free_port()
    cfg = app_config(port, tmp_path, "mymod:make")
    with Daemon(tmp_path, cfg).start() as d:
        cfg["workers"]["prefork"] = False  # type: ignore[index]
        d.write_config(cfg)
        where = next(f"{d.config_path}:{i}:12" for i, line in enumerate(d.config_path.read_text().splitlines(), 1)
                     if line.strip() == "prefork: false")
        warning = (f"warning: {where}: workers.prefork: false has no effect: a `module:factory` app "
                   "is always forked from its generation's template")
        checked = upgraderd("check", "-c", str(d.config_path))
        assert checked.returncode == 0 and checked.stderr.splitlines() == [warning], checked
        r = upgraderd("reload", "-c", str(d.config_path), "--pidfile", str(d.pidfile))
        assert r.returncode == 0 and r.stderr.splitlines() == [warning], r
        assert warning.removeprefix("warning: ") in d.log()
