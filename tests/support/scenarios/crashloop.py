"""One reuseport slot crash-loops under new-connection echo load; print the outcome as JSON.

    HOST_NETNS=$(readlink /proc/self/ns/net) unshare -n python -m tests.support.scenarios.crashloop WORKDIR

Run in a private network namespace with net.ipv4.tcp_migrate_req=0 (the
setting is per namespace; the host's is never touched). Four slots serve
echo; once generation 1 is ACTIVE and the load runs, slot 2's worker starts
crashing (tests/fixtures/crashloop_worker.py): each of its workers says READY,
serves for 0.3 s, and exits, leaving whatever the kernel queued on the slot's
socket, until the slot is FATAL and its socket closes. Steering keeps new
connections away from the slot while it has no READY worker; what queued
before that is the master's to save.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT
from tests.support.loadgen import Load
from tests.support.scrape import fetch, metrics_url
from tests.support.upgraderd_proc import Daemon, echo_config, free_port

FIXTURE = str(ROOT / "tests" / "fixtures" / "crashloop_worker.py")
CRASH_LOOP = 5  # crashes until FATAL: 4 respawns after 0.2, 0.4, 0.8 and 1 s of back-off
CLIENT_TIMEOUT = 3.0


def config(port: int, flag: Path, slots: str, count: int = 4) -> dict[str, object]:
    """Return a config for `count` slots of the crash-loop fixture, crashing on `slots` once `flag` exists."""
    cfg = echo_config(port, count=count, restart={"backoff": "0.2s", "max_backoff": "1s",
                                                  "crash_loop": CRASH_LOOP})
    cfg["workers"] = {"count": count, "command": [sys.executable, FIXTURE, str(flag), slots]}
    return cfg


def main(workdir: str) -> int:
    if os.readlink("/proc/self/ns/net") == os.environ.get("HOST_NETNS", ""):
        print("refusing to run in the caller's network namespace; use unshare -n", file=sys.stderr)
        return 2
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text("0\n")
    port = free_port()
    flag = Path(workdir) / "crash"
    cfg = config(port, flag, "2")
    with Daemon(Path(workdir), cfg).start() as d:
        load = Load("127.0.0.1", port, threads=4, max_seconds=90, timeout=CLIENT_TIMEOUT).start("echo")
        assert load.wait_for_ok(200, timeout=30)
        flag.touch()
        d.wait_log(r"generation 1 slot 2: crash loop", timeout=60)
        readyz = fetch(metrics_url(cfg, "/readyz"))[:2]
        # The load goes on past the FATAL close; stop() then waits for every round trip in
        # flight, so a connection still queued somewhere ends as an answer, a reset or a timeout.
        assert load.wait_for_ok(load.result.ok + 200, timeout=30)
        result = load.stop()
        log = d.log()
    print(json.dumps({
        "ok": result.ok,
        "failures": result.failures,
        "examples": result.examples,
        "crashes": log.count("generation 1 slot 2: worker died"),
        "fatal": "generation 1 slot 2: crash loop" in log,
        "readyz_while_looping": list(readyz),
        "rescued": log.count("queued on its socket"),
        "max_latency": max(result.latencies, default=0.0),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
