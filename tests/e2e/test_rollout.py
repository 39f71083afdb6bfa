"""Canary rollouts with the real daemon: a bad release is rolled back, a good one promoted.

Each test serves generation 1 under a bounded echo load (new connections, 8
client threads), writes a release with `rollout.strategy: canary` and runs the
real `upgraderd reload`, which waits for the verdict. Every client round trip
of the whole run must succeed: the canary never takes the serving generation
down, and a rolled-back canary leaves nothing queued behind.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest

from tests.e2e.test_cli import upgraderd
from tests.support import ROOT
from tests.support.loadgen import Load
from tests.support.scrape import scrape, value
from tests.support.upgraderd_proc import Daemon, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e

CRASHLOOP = str(ROOT / "tests" / "fixtures" / "crashloop_worker.py")
HEALTH = str(ROOT / "tests" / "fixtures" / "health_worker.py")


def canary(window: str, **checks: Any) -> dict[str, Any]:
    return {"strategy": "canary", "canary": {"workers": 1, "window": window}, "checks": checks}


def loaded(port: int) -> Load:
    load = Load("127.0.0.1", port, threads=8, max_seconds=90).start("echo")
    assert load.wait_for_ok(200, timeout=30)
    return load


def finish(load: Load) -> dict[str, int]:
    """Let the load run 200 more round trips on what serves now, stop it, return its failures."""
    assert load.wait_for_ok(load.result.ok + 200, timeout=30)
    return load.stop().failures


def serving_only(d: Daemon, generation: int) -> None:
    wait_until(lambda: [(g["number"], g["state"]) for g in (d.status() or {"generations": []})["generations"]]
               == [(generation, "ACTIVE")], 20, f"generation {generation} alone, ACTIVE")


def test_a_release_that_crashes_in_the_window_is_rolled_back(tmp_path):
    port = free_port()
    flag = tmp_path / "crash"
    flag.touch()
    v1 = echo_config(port, count=4)
    with Daemon(tmp_path, v1).start() as d:
        load = loaded(port)
        # The canary serves echo correctly for 2 s, then exits 1 (it never drops what it accepted).
        d.write_config({**v1, "workers": {"count": 4, "command": [sys.executable, CRASHLOOP, str(flag), "all", "2"]},
                        "rollout": canary("30s")})
        r = upgraderd("reload", "--pidfile", str(d.pidfile))
        assert r.returncode == 1, r
        lines = r.stderr.splitlines()
        assert lines[0] == "upgraderd: reload failed: generation 2 was rolled back (the old one keeps serving)"
        assert re.fullmatch(r"generation 2 rolled back: check crashes failed: 1 worker exit\(s\) of generation 2 "
                            r"\(allowed: 0\); last: slot 0 pid \d+ exit code 1", lines[1]), lines
        serving_only(d, 1)
        assert finish(load) == {}
        samples = scrape(v1)
        assert value(samples, "upgraderd_rollouts_total", result="rolled_back") == 1
        assert value(samples, "upgraderd_rollouts_total", result="promoted") == 0
        assert value(samples, "upgraderd_rollout_check_failures_total", check="crashes") == 1
        assert value(samples, "upgraderd_reloads_total", result="failed") == 1
        assert value(samples, "upgraderd_generation") == 1
        assert d.wait_log(r"rollout: generation 2 rolled back after [0-9.]+s: check crashes failed")


def test_a_good_release_is_promoted_after_its_window(tmp_path):
    port = free_port()
    v1 = echo_config(port, count=4)
    with Daemon(tmp_path, v1).start() as d:
        load = loaded(port)
        d.write_config({**v1, "workers": {"count": 4, "app": "echo", "env": {"RELEASE": "2"}},
                        "rollout": canary("5s")})   # room for a slow `status` under CI's load
        reload = subprocess.Popen([sys.executable, "-m", "upgraderd", "reload", "--pidfile", str(d.pidfile)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            wait_until(lambda: ((d.status() or {}).get("rollout") or {}).get("phase") == "canary", 20,
                       "the status to show the canary")
            shown = upgraderd("status", "--pidfile", str(d.pidfile)).stdout
            assert re.search(r"^rollout: generation 2 canary, 1 of 4 workers ready beside generation 1; "
                             r"verdict in [0-5]s \(checks: crashes\)$", shown, re.M), shown
            assert value(scrape(v1), "upgraderd_generation") == 1
            out, err = reload.communicate(timeout=60)
        finally:
            if reload.poll() is None:
                reload.kill()
                reload.wait()
        assert (reload.returncode, out, err) == (0, "reload done: generation 2 ACTIVE\n", "")
        took = float(d.wait_log(r"rollout: generation 2 promoted after ([0-9.]+)s")[0].group(1))
        assert took >= 5.0
        serving_only(d, 2)
        assert finish(load) == {}
        samples = scrape(v1)
        assert value(samples, "upgraderd_rollouts_total", result="promoted") == 1
        assert value(samples, "upgraderd_reloads_total", result="success") == 1


def test_a_failing_http_check_rolls_back(tmp_path):
    port = free_port()

    def release(healthz: int, **rollout: Any) -> dict[str, Any]:
        return echo_config(port, count=2, metrics=metrics,
                           workers={"count": 2, "command": [sys.executable, HEALTH, "{probe_port}", str(healthz)]},
                           ready={"mode": "http", "url": "http://127.0.0.1:{probe_port}/ready", "timeout": "20s"},
                           **rollout)
    metrics = {"listen": f"127.0.0.1:{free_port()}"}
    with Daemon(tmp_path, release(200)).start() as d:
        load = loaded(port)
        d.write_config(release(500, rollout=canary("30s", http={"url": "http://127.0.0.1:{probe_port}/healthz",
                                                                 "every": "200ms", "timeout": "1s"})))
        r = upgraderd("reload", "--pidfile", str(d.pidfile))
        assert r.returncode == 1, r
        assert re.fullmatch(r"generation 2 rolled back: check http failed: GET http://127\.0\.0\.1:\d+/healthz "
                            r"\(slot 0\) got no 2xx within 1s: answered HTTP/1\.0 500 Internal Server Error "
                            r"\(0 probe\(s\) answered 2xx before\)", r.stderr.splitlines()[1]), r.stderr
        serving_only(d, 1)
        assert finish(load) == {}
        assert value(scrape(release(200)), "upgraderd_rollout_check_failures_total", check="http") == 1


def test_rollback_aborts_a_window_and_promote_ends_one(tmp_path):
    port = free_port()
    v1 = echo_config(port, count=3)
    with Daemon(tmp_path, v1).start() as d:
        load = loaded(port)
        d.write_config({**v1, "rollout": canary("120s")})
        pidfile = ("--pidfile", str(d.pidfile))
        for generation, action, verdict in ((2, "rollback", "rollback done: generation 2 rolled back, generation "
                                             "1 serves\n"), (3, "promote", "promote done: generation 3 ACTIVE\n")):
            reload = subprocess.Popen([sys.executable, "-m", "upgraderd", "reload", *pidfile],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            try:
                wait_until(lambda: ((d.status() or {}).get("rollout") or {}).get("generation") == generation, 20,
                           f"the canary of generation {generation}")
                r = upgraderd(action, *pidfile)
                assert (r.returncode, r.stdout, r.stderr) == (0, verdict, ""), r
                out, err = reload.communicate(timeout=30)
            finally:
                if reload.poll() is None:
                    reload.kill()
                    reload.wait()
            if action == "rollback":
                assert reload.returncode == 1
                assert err.splitlines()[1] == "generation 2 rolled back: aborted by `upgraderd rollback`"
                serving_only(d, 1)
            else:
                assert (reload.returncode, out) == (0, "reload done: generation 3 ACTIVE\n")
                serving_only(d, 3)
        r = upgraderd("promote", *pidfile)
        assert (r.returncode, r.stderr) == (1, "upgraderd: no rollout is under way: nothing to promote\n")
        assert finish(load) == {}
        samples = scrape(v1)
        assert value(samples, "upgraderd_rollouts_total", result="promoted") == 1
        assert value(samples, "upgraderd_rollouts_total", result="rolled_back") == 1
