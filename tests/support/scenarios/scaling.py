"""TTIN twice then TTOU down to one worker, under load; print the load outcome as JSON.

Runnable as `python -m tests.support.scenarios.scaling MODE WORKDIR` from the
repository root, so a test can run it inside a network namespace it creates
(where it may set net.ipv4.tcp_migrate_req).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from tests.support.loadgen import Load
from tests.support.scrape import scrape
from tests.support.upgraderd_proc import Daemon, echo_config, free_port, wait_until


def listening_sockets(port: int) -> int:
    """Count the LISTEN sockets on 127.0.0.1:port (state 0A in /proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for r in rows if r[3] == "0A" and int(r[1].rsplit(":", 1)[1], 16) == port)


def run(workdir: Path, mode: str) -> dict[str, object]:
    """Run the scenario; raise AssertionError on any wrong state; return the load outcome."""
    port = free_port()
    cfg = echo_config(port, mode=mode, count=2)
    with Daemon(workdir, cfg).start() as d:
        load = Load("127.0.0.1", port, threads=4, max_seconds=60).start("echo")
        assert load.wait_for_ok(100)
        for expected in (3, 4):
            d.send(signal.SIGTTIN)
            d.wait_log(rf"generation 1 slot {expected - 1} added, {expected} workers")
            wait_until(lambda: len(d.workers()) == expected, 15, f"{expected} workers")
        assert listening_sockets(port) == (4 if mode == "reuseport" else 1)
        assert load.wait_for_ok(load.result.ok + 200)
        for left in (3, 2, 1):
            d.send(signal.SIGTTOU)
            d.wait_log(rf"slot {left} retiring, {left} workers left")
            d.wait_log(rf"generation 1 slot {left}: retired")
            assert len(d.workers()) == left
            assert load.wait_for_ok(load.result.ok + 100)
        # The retired slots' sockets are closed: no connection can queue where nobody accepts.
        wait_until(lambda: listening_sockets(port) == 1, 10, "one listening socket")
        d.send(signal.SIGTTOU)
        d.wait_log(r"ignored, generation 1 is down to one worker")
        # A reload goes back to the configured count.
        d.hup()
        d.wait_log(r"reload done: generation 2 ACTIVE")
        assert listening_sockets(port) == (2 if mode == "reuseport" else 1)
        assert load.wait_for_ok(load.result.ok + 200)
        result = load.stop()
        wait_until(lambda: len(d.workers()) == 2, 15, "2 workers of generation 2")
        warned = "tcp_migrate_req is not 1" in d.log()
        # What tells a stall apart from a starved machine when a round trip fails: hand-offs
        # that timed out (a taker that did not answer within the giver's 2 s) or none at all.
        handoff_failures = {dict(labels)["reason"]: v for (name, labels), v in scrape(cfg).items()
                            if name == "upgraderd_handoff_failures_total" and v}
    return {"ok": result.ok, "failures": result.failures, "warned": warned, "examples": result.examples,
            "slowest_ok": round(max(result.latencies, default=0.0), 3), "handoff_failures": handoff_failures,
            "load": open("/proc/loadavg").read().split()[0]}


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[2]), sys.argv[1])))
