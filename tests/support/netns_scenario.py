"""Run the worker-bind example under reloads, inside the network namespace this process is in.

    HOST_NETNS=$(readlink /proc/self/ns/net) unshare -n python -m tests.support.netns_scenario \
        WORKDIR INITIAL POLICY RELOADS

tests/e2e/test_worker_bind.py starts it under `unshare -n`, in a network
namespace of its own: net.ipv4.tcp_migrate_req is per namespace, so writing
INITIAL (0 or 1) here, and the master's `kernel.tcp_migrate_req: POLICY`,
never touch the host's setting (it refuses to run in the namespace named
by $HOST_NETNS). It brings up the namespace's loopback, runs
the daemon and the load in it, and prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.reloads import example_config, reload_under_load
from tests.support.scrape import scrape, value
from tests.support.upgraderd_proc import Daemon, free_port

MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"
# TcpExt counters of this namespace that say where a reset came from.
COUNTERS = ("TCPMigrateReqSuccess", "TCPMigrateReqFailure", "ListenOverflows", "ListenDrops")


def tcp_counters() -> dict[str, int]:
    """Return this namespace's TcpExt counters named in COUNTERS."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()
             if line.startswith("TcpExt:")]
    table = dict(zip(lines[0][1:], map(int, lines[1][1:])))
    return {name: table.get(name, -1) for name in COUNTERS}


def main(workdir: str, initial: str, policy: str, reloads: str) -> int:
    if os.readlink("/proc/self/ns/net") == os.environ.get("HOST_NETNS", ""):
        print("refusing to run in the caller's network namespace; use unshare -n", file=sys.stderr)
        return 2
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    Path(MIGRATE_REQ).write_text(initial + "\n")
    port = free_port()
    cfg = example_config("worker_bind", port)
    cfg["kernel"] = {"tcp_migrate_req": policy}
    cfg["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
    with Daemon(Path(workdir), cfg).start() as d:
        report = reload_under_load(d, port, int(reloads))
        log = d.log()
        samples = scrape(cfg)
        counters = tcp_counters()
    result = report.result
    print(json.dumps({
        "initial": int(initial),
        "final": int(Path(MIGRATE_REQ).read_text()),
        "ok": result.ok,
        "failures": result.failures,
        "examples": result.examples,
        "reloads": len(report.generations),
        "stale": sum(sum(c.values()) for c in report.stale.values()),
        "fresh_min": min(report.fresh.values()),
        "servers": sorted({b.split("server=")[1].split()[0] for b in result.bodies}),
        "warned": "draining the worker-bind listener(s) web can reset connections" in log,
        "set_logged": "set net.ipv4.tcp_migrate_req=1 (was 0)" in log,
        "risk_metric": value(samples, "upgraderd_worker_bind_reset_risk"),
        "migrate_req_metric": value(samples, "upgraderd_kernel_tcp_migrate_req"),
        "tcp": counters,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
