"""Hot upgrades under load: not one connection may fail."""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest

from tests.support.loadgen import Load
from tests.support.upgraderd_proc import Daemon, alive, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e

HUPS = 50


@pytest.mark.parametrize("mode", ["reuseport", "shared"])
def test_fifty_hups_under_load_drop_nothing(tmp_path, mode):
    port = free_port()
    with Daemon(tmp_path, echo_config(port, mode=mode)).start() as d:
        first = d.workers()
        assert len(first) == 4
        load = Load("127.0.0.1", port, threads=6, max_seconds=120).start("echo")
        assert load.wait_for_ok(200)
        for _ in range(HUPS):
            last_hup = time.time()
            d.hup()
            time.sleep(0.1)  # the HUP rate under test, not a wait for a condition
        final = d.settled()
        assert load.wait_for_ok(load.result.ok + 200)
        result = load.stop()
        log = d.log()
        assert result.failures == {}, (result.failures, result.examples)
        assert "FAILED" not in log
        # Every HUP rolled a generation; those that arrived while one was STARTING coalesced.
        started = [int(n) for n in re.findall(r"generation (\d+) STARTING:", log)]
        assert started == list(range(1, final + 1))
        assert 2 <= final - 1 <= HUPS
        # The last HUP was not lost in coalescing: the newest generation started after it.
        stamp = re.search(rf"^(\S+) .*generation {final} STARTING:", log, re.M).group(1)
        assert datetime.fromisoformat(stamp).timestamp() >= last_hup - 0.002  # ISO 8601, with offset
        # The old generations drained and exited; only the newest generation's 4 workers remain.
        wait_until(lambda: all(f"generation {n} DRAINING -> RETIRED" in d.log() for n in range(1, final)),
                   10, "every old generation to retire")
        drains = [float(x) for x in re.findall(r"DRAINING -> RETIRED after ([0-9.]+)s", d.log())]
        assert len(drains) == final - 1 and max(drains) < 10.0  # drain.timeout
        assert "SIGKILL" not in d.log()
        now = d.workers()
        assert len(now) == 4 and not (now & first)
        assert not any(alive(p) for p in first)
        took = sorted(float(x) for x in re.findall(r"ACTIVE ([0-9.]+)s after HUP", log))
        boot = sorted(float(x) for x in re.findall(r"STARTING -> ACTIVE after ([0-9.]+)s", log))
        print(f"\n{mode}: {result.ok} round trips, {HUPS} HUPs -> {final - 1} reloads, "
              f"failures {result.failures}, HUP->ACTIVE p50 {took[len(took) // 2]:.3f}s "
              f"max {took[-1]:.3f}s, start->ACTIVE p50 {boot[len(boot) // 2]:.3f}s max {boot[-1]:.3f}s")


def test_keepalive_connections_survive_drain(tmp_path):
    port = free_port()
    cfg = echo_config(port, drain={"timeout": "60s", "handoff": "off"})  # the drain without hand-off
    with Daemon(tmp_path, cfg).start() as d:
        first = d.workers()
        load = Load("127.0.0.1", port, threads=8, max_seconds=60).start("echo-keepalive")
        assert load.wait_for_ok(400)
        for _ in range(10):
            d.hup()
            time.sleep(0.1)  # the HUP rate under test, not a wait for a condition
        d.settled()
        # Held connections are still served by the draining generation 1.
        before = load.result.ok
        assert load.wait_for_ok(before + 400)
        assert any(alive(p) for p in first)
        assert "generation 1 ACTIVE -> DRAINING" in d.log()
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        # Once the clients close, the draining workers exit well before the 60s timeout.
        wait_until(lambda: not any(alive(p) for p in first), 10, "generation 1 workers to exit")
        assert "SIGKILL" not in d.log()
