"""gunicorn and the uvicorn example as `command:` workers through a canary, with the http and command checks.

The examples (config/examples/gunicorn.yaml, uvicorn.yaml) run as they ship,
moved to a free port, with a canary of 1 of their 2 workers: the `http` check
GETs the service's port every 200 ms (a command worker has no health port of
its own, so the probe reaches either release), and the `command` check runs a
smoke test (tests/fixtures/smoke.py) that must see the new release's version
answer within 40 requests (the canary gets about 1/4 of new connections). A release the smoke test finds wrong is rolled back (gunicorn); a
right one is promoted; no client request fails either way.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from tests.e2e.test_cli import upgraderd
from tests.support import ROOT
from tests.support.loadgen import Load
from tests.support.reloads import example_config
from tests.support.upgraderd_proc import Daemon, free_port, wait_until

pytestmark = pytest.mark.e2e

SMOKE = str(ROOT / "tests" / "fixtures" / "smoke.py")


def with_canary(cfg: dict[str, Any], port: int, version: str, expect: str, window: str) -> dict[str, Any]:
    workers = {**cfg["workers"], "env": {**cfg["workers"].get("env", {}), "APP_VERSION": version}}
    return {**cfg, "workers": workers, "rollout": {
        "strategy": "canary", "canary": {"workers": 1, "window": window},
        "checks": {"http": {"url": f"http://127.0.0.1:{{port:web}}/", "every": "200ms", "timeout": "2s"},
                   "command": [sys.executable, SMOKE, f"http://127.0.0.1:{port}/", expect, "40"]}}}


def reload(d: Daemon) -> subprocess.CompletedProcess[str]:
    """Run `upgraderd reload` (it waits for the verdict) while the status shows the canary."""
    r = subprocess.Popen([sys.executable, "-m", "upgraderd", "reload", "--pidfile", str(d.pidfile)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_until(lambda: ((d.status() or {}).get("rollout") or {}).get("phase") == "canary" or r.poll() is not None,
                   60, "the canary")
        out, err = r.communicate(timeout=90)
    finally:
        if r.poll() is None:
            r.kill()
            r.wait()
    return subprocess.CompletedProcess(r.args, r.returncode, out, err)


@pytest.mark.parametrize("name, args", [("gunicorn", {}), ("uvicorn", {"loop": "asyncio"})])
def test_a_command_server_goes_through_a_canary_with_http_and_command_checks(tmp_path, name, args):
    port = free_port()
    v1 = example_config(name, port, **args)
    with Daemon(tmp_path, v1).start() as d:
        load = Load("127.0.0.1", port, threads=4, max_seconds=150).start("http")
        assert load.wait_for_ok(50, timeout=30)
        if name == "gunicorn":   # a release deployed without its new version: the smoke test says so
            d.write_config(with_canary(v1, port, "1", expect="2", window="30s"))
            r = reload(d)
            assert r.returncode == 1, r
            assert r.stderr.splitlines()[1] == (f"generation 2 rolled back: check command failed: {sys.executable} "
                                                f"{SMOKE} http://127.0.0.1:{port}/ 2 40 exit code 1"), r.stderr
            assert "smoke: version 2 not seen in 40 answers" in d.log()
            assert d.settled() == 1
        d.write_config(with_canary(v1, port, "2", expect="2", window="10s"))
        r = reload(d)
        new = 3 if name == "gunicorn" else 2
        assert (r.returncode, r.stdout, r.stderr) == (0, f"reload done: generation {new} ACTIVE\n", ""), r
        assert d.wait_log(rf"rollout: generation {new} promoted after [0-9.]+s")
        assert "smoke: version 2 answered after" in d.log()
        assert d.settled() == new
        mark = load.mark()
        assert load.wait_for_ok(load.result.ok + 50, timeout=30)
        assert all(" version=2 " in body for body in load.answers_since(mark))
        result = load.stop()
    assert result.failures == {}, (result.failures, result.examples)
    print(f"\n{name}: {result.ok} requests through the canary{' and a rollback' if name == 'gunicorn' else ''}, "
          "0 failed")
