"""`threads: N`: N threads per built-in worker, each with its own selector; reloads drop nothing."""

from __future__ import annotations

import signal
import time

import pytest

from tests.support.loadgen import Load
from tests.support.upgraderd_proc import Daemon, alive, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


@pytest.mark.parametrize("target", ["echo", "echo-keepalive"])
def test_threaded_workers_reload_under_load_drop_nothing(tmp_path, target):
    port = free_port()
    cfg = echo_config(port, count=2, drain={"timeout": "20s"})
    cfg["workers"] = {"count": 2, "app": "echo", "threads": 4}
    with Daemon(tmp_path, cfg).start() as d:
        first = d.workers()
        assert [threads_of(p) for p in first] == [4, 4]
        load = Load("127.0.0.1", port, threads=8, max_seconds=90).start(target)
        assert load.wait_for_ok(300)
        for _ in range(10):
            d.send(signal.SIGHUP)
            time.sleep(0.2)  # the HUP rate under test, not a wait for a condition
        final = d.settled()
        assert final >= 3
        assert load.wait_for_ok(load.result.ok + 300)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        # Draining threaded workers exit by themselves once their clients are gone.
        wait_until(lambda: all(f"generation {n} DRAINING -> RETIRED" in d.log() for n in range(1, final)),
                   15, "every old generation to retire")
        assert not any(alive(p) for p in first)
        now = d.workers()
        assert len(now) == 2 and [threads_of(p) for p in now] == [4, 4]
        assert "SIGKILL" not in d.log() and "FAILED" not in d.log()
