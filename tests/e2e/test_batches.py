"""Rollouts in batches with the real daemon: 8 workers replaced one at a time, or rolled back.

A sampler thread counts the master's live worker children every few
milliseconds (by process title, so the generations' prefork templates are not
counted; draining workers are, until they are reaped) while persistent echo
clients (hand-off) and clients with a new connection per round trip run: the
peak must be workers.count + batches.size, and no client may fail. The workers
are forked from a template (prefork) to keep the test short: 16 interpreter
starts took most of its time. The real `upgraderd reload` waits for the verdict.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_cli import upgraderd
from tests.support import ROOT
from tests.support.loadgen import Load
from tests.support.persistent import Streams
from tests.support.scrape import scrape, value
from tests.support.upgraderd_proc import Daemon, children, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e

CRASHLOOP = str(ROOT / "tests" / "fixtures" / "crashloop_worker.py")


def workers(master: int) -> int:
    """Return how many live children of `master` are titled as workers (a forked worker takes its
    title before it is let run, and after the middle process that forked it has exited)."""
    n = 0
    for pid in children(master):
        try:
            n += Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"upgraderd: worker ")
        except OSError:
            pass   # gone meanwhile
    return n


class Peak:
    """Sample how many workers the master has, every `every` seconds, until stopped (bounded)."""

    def __init__(self, master: int, every: float = 0.005, max_seconds: float = 60.0) -> None:
        self.master, self.every, self.deadline = master, every, time.monotonic() + max_seconds
        self.peak, self.samples = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Peak:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            self.peak = max(self.peak, workers(self.master))
            self.samples += 1
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


def batches(size: int, pause: str, **checks: Any) -> dict[str, Any]:
    return {"strategy": "batches", "batches": {"size": size, "pause": pause}, "checks": checks}


def serving_only(d: Daemon, generation: int, count: int) -> None:
    wait_until(lambda: [(g["number"], g["state"]) for g in (d.status() or {"generations": []})["generations"]]
               == [(generation, "ACTIVE")] and workers(d.pid) == count, 20,
               f"generation {generation} alone, ACTIVE, with {count} workers")


def test_batches_of_one_replace_eight_workers_with_at_most_nine_alive(tmp_path):
    port = free_port()
    v1 = echo_config(port, count=8, drain={"timeout": "5s"}, ready={"timeout": "30s"},
                     workers={"count": 8, "app": "echo", "prefork": True})
    with Daemon(tmp_path, v1).start() as d:
        wait_until(lambda: workers(d.pid) == 8, 20, "8 workers")
        streams = Streams(port, 16).start()
        load = Load("127.0.0.1", port, threads=4, max_seconds=60).start("echo")
        assert streams.wait_ok(200) and load.wait_for_ok(200, timeout=30)
        d.write_config({**v1, "rollout": batches(1, "200ms")})
        peak = Peak(d.pid).start()
        r = upgraderd("reload", "--pidfile", str(d.pidfile))
        assert (r.returncode, r.stdout, r.stderr) == (0, "reload done: generation 2 ACTIVE\n", ""), r
        serving_only(d, 2, 8)
        # 8 batches with a 200 ms pause each: the roll takes at least 1.6 s, so 16 samples is one
        # per 100 ms at the least (71 were taken under CI's load, 300+ on a quiet machine).
        assert peak.stop() == 9 and peak.samples >= 16
        assert len(d.wait_log(r"rollout: generation 2 batch \d of 8: slot\(s\) \d starting", count=8)) == 8
        samples = scrape(v1)
        assert value(samples, "upgraderd_rollouts_total", result="promoted") == 1
        assert value(samples, "upgraderd_reloads_total", result="success") == 1
        assert value(samples, "upgraderd_generation") == 2
        assert streams.wait_ok(streams.result.ok + 200) and load.wait_for_ok(load.result.ok + 200, timeout=30)
        moved = streams.stop()
        assert (moved.failures, moved.ports_kept) == ({}, True)
        assert load.stop().failures == {}


def test_a_crash_at_a_later_batch_rolls_back_and_the_old_generation_grows_back(tmp_path):
    port = free_port()
    flag = tmp_path / "crash"
    flag.touch()
    v1 = echo_config(port, count=2, ready={"timeout": "30s"})
    with Daemon(tmp_path, v1).start() as d:
        d.wait_workers(2)
        load = Load("127.0.0.1", port, threads=4, max_seconds=60).start("echo")
        assert load.wait_for_ok(200, timeout=30)
        # Each new worker serves echo for 2 s, then exits 1: batch 1 passes its 1 s pause, a later one fails.
        d.write_config({**v1, "workers": {"count": 2, "command": [sys.executable, CRASHLOOP, str(flag), "all", "2"]},
                        "rollout": batches(1, "1s")})
        r = upgraderd("reload", "--pidfile", str(d.pidfile))
        assert r.returncode == 1, r
        assert re.fullmatch(r"generation 2 rolled back: check crashes failed: 1 worker exit\(s\) of generation 2 "
                            r"\(allowed: 0\); last: slot \d pid \d+ exit code 1", r.stderr.splitlines()[1]), r.stderr
        assert d.wait_log(r"rollout: generation 1 gets back slot\(s\) 0")
        serving_only(d, 1, 2)
        samples = scrape(v1)
        assert value(samples, "upgraderd_rollouts_total", result="rolled_back") == 1
        assert value(samples, "upgraderd_rollout_check_failures_total", check="crashes") == 1
        assert value(samples, "upgraderd_generation") == 1
        assert load.wait_for_ok(load.result.ok + 200, timeout=30)
        assert load.stop().failures == {}
