"""One reuseport slot crash-loops under new-connection echo load; print the outcome as JSON.

    HOST_NETNS=$(readlink /proc/self/ns/net) unshare -n python -m tests.support.scenarios.crashloop \
        WORKDIR [THREADS [BACKOFF [TREE]]]

Run in a private network namespace with net.ipv4.tcp_migrate_req=0 (the
setting is per namespace; the host's is never touched). Four slots serve
echo; once generation 1 is ACTIVE and the load runs, slot 2's worker starts
crashing (tests/fixtures/crashloop_worker.py): each of its workers says READY,
serves for 0.3 s, and exits, leaving whatever the kernel queued on the slot's
socket, until the slot is FATAL and its socket closes. Steering keeps new
connections away from the slot while it has no READY worker; what queued
before that is the master's to save. THREADS client threads (default 4)
make a new connection per round trip, with a 3 s timeout; BACKOFF (default
0.2s) is `restart.backoff`, doubling up to `max(1s, BACKOFF)`. TREE (default:
this checkout) is the directory the master runs from: bench/crashloop.py
points it at an export of older code to measure "before".
"""

from __future__ import annotations

import json
import os
import re
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


def config(port: int, flag: Path, slots: str, count: int = 4, backoff: float = 0.2) -> dict[str, object]:
    """Return a config for `count` slots of the crash-loop fixture, crashing on `slots` once `flag` exists."""
    restart = {"backoff": f"{backoff:g}s", "max_backoff": f"{max(1.0, backoff):g}s", "crash_loop": CRASH_LOOP}
    cfg = echo_config(port, count=count, restart=restart)
    cfg["workers"] = {"count": count, "command": [sys.executable, FIXTURE, str(flag), slots]}
    return cfg


def main(workdir: str, threads: str = "4", backoff: str = "0.2", tree: str = str(ROOT)) -> int:
    if os.readlink("/proc/self/ns/net") == os.environ.get("HOST_NETNS", ""):
        print("refusing to run in the caller's network namespace; use unshare -n", file=sys.stderr)
        return 2
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text("0\n")
    port = free_port()
    flag = Path(workdir) / "crash"
    cfg = config(port, flag, "2", backoff=float(backoff))
    with Daemon(Path(workdir), cfg, cwd=Path(tree)).start() as d:
        load = Load("127.0.0.1", port, threads=int(threads), max_seconds=120, timeout=CLIENT_TIMEOUT).start("echo")
        assert load.wait_for_ok(200, timeout=30)
        flag.touch()
        d.wait_log(r"generation 1 slot 2: crash loop", timeout=90)
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
        "rescued": sum(int(n) for n in re.findall(r"took (\d+) connection\(s\) queued on its socket", log)),
        "max_latency": max(result.latencies, default=0.0),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
