"""One rollout under load, end to end: serve release 1, reload to release 2 with a canary, wait for the verdict.

Used by tests/e2e/test_rollout_traffic.py (a lean load and a short window) and
bench/rollout_scenarios.py (64 keep-alive and 64 new-connection clients).
The daemon is real, the reload is the real `upgraderd reload` (which waits for
the verdict), and the load is tests/support/rolloutload.py, whose answers name
the generation that gave them. `Outcome` holds what the done-when figures
are made of: the reload's exit and message, when the canary started serving
and when the verdict came (the master's log), and every answer and failure.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import ROOT
from tests.support.rolloutload import RolloutLoad, Tally
from tests.support.upgraderd_proc import Daemon, free_port, wait_until

FIXTURES = str(ROOT / "tests" / "fixtures")


def release(port: int, metrics: str, app: str, count: int = 4, **env: str) -> dict[str, Any]:
    """Return a config serving `app` (http, or asgi:release_app:app with `env` as its fault) on `port`."""
    workers: dict[str, Any] = {"count": count, "app": app, "env": dict(env)}
    if app.startswith("asgi:"):
        workers["cwd"] = FIXTURES
    return {"listeners": [{"name": "web", "host": "127.0.0.1", "port": port}], "workers": workers,
            "ready": {"timeout": "20s"}, "drain": {"timeout": "10s", "handoff": "auto"},
            "metrics": {"listen": metrics}}


def canary(window: str, workers: int = 1, **checks: Any) -> dict[str, Any]:
    return {"rollout": {"strategy": "canary", "canary": {"workers": workers, "window": window}, "checks": checks}}


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    serving_at: float          # monotonic: the canary's window began (seen in the log; within a poll)
    verdict_at: float          # monotonic: `upgraderd reload` returned
    tally: Tally
    settled: int               # the generation serving alone at the end
    log: str = ""              # the master's log

    def canary_share(self) -> tuple[int, int]:
        """Return (answers of generation 2, all answers) during the window."""
        return self.tally.share(2, self.serving_at, self.verdict_at)

    def failures_after_verdict(self) -> list[tuple[float, str, int]]:
        return [f for f in self.tally.failures if f[0] > self.verdict_at]


def run(tmp: Path, v1: dict[str, Any], v2: dict[str, Any], keepalive: int, fresh: int, warm: int = 100,
        after: int = 100, timeout: float = 120.0) -> Outcome:
    """Serve `v1` under load, reload to `v2`, let `after` more answers come; return what happened."""
    with Daemon(tmp, v1).start() as d:
        load = RolloutLoad(v1["listeners"][0]["port"], keepalive, fresh, max_seconds=timeout + 60).start()
        try:
            wait_until(lambda: load.count() >= warm, 30, f"{warm} answers from release 1")
            d.write_config(v2)
            reload = subprocess.Popen([sys.executable, "-m", "upgraderd", "reload", "--pidfile", str(d.pidfile),
                                       "--timeout", f"{timeout:g}"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT)
            serving_at = _when_logged(d, r"rollout: generation 2 canary serving", reload)
            out, err = reload.communicate(timeout=timeout + 30)
            verdict_at = time.monotonic()
            settled = d.settled()
            # The generation that lost drains meanwhile (its requests in flight finish there): count
            # the answers after it is gone, so that they all come from the one left.
            wait_until(lambda: len((d.status() or {}).get("generations", [None, None])) == 1, 30,
                       "one generation left")
            base = load.count()
            wait_until(lambda: load.count() >= base + after, 30, f"{after} answers after the verdict")
        finally:
            tally = load.stop()
        log = d.log()
    return Outcome(reload.returncode, out, err, serving_at, verdict_at, tally, settled, log)


def _when_logged(d: Daemon, pattern: str, reload: subprocess.Popen[str]) -> float:
    """Return the monotonic time at which `pattern` showed up in the log (polled every 20 ms)."""
    wait_until(lambda: re.search(pattern, d.log()) or reload.poll() is not None, 60, pattern)
    return time.monotonic()


def port_and_metrics() -> tuple[int, str]:
    return free_port(), f"127.0.0.1:{free_port()}"
