"""Benchmark: reloads while 2,000 idle connections sit on the metrics port, at nofile 1024.

Each repeat starts one master under `prlimit --nofile=1024:1024` (the built-in
http app, 2 workers) and runs two phases against it:

- quiet: `--reloads` HUPs, one after the other, each waited for;
- flood: the same, while `--connections` idle TCP connections to the metrics
  endpoint are held open (they were opened before the phase and send nothing).

HUP -> ACTIVE is read from the master's log ("ACTIVE N s after HUP"). The
ratio flood/quiet is taken within each repeat, so machine noise mostly
cancels; the table shows medians over repeats. Also reported, during the
flood: how long `upgraderd status` takes, the master's open fds, the master's
CPU over an idle 2 s window, and how many connections the endpoint refused.

    .venv/bin/python -m bench.metrics_flood [--repeats 3] [--reloads 5] [--connections 2000]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from tests.support.upgraderd_proc import ROOT, Daemon, echo_config, free_port  # noqa: E402
from tests.support.scrape import scrape, value  # noqa: E402

HUP_TOOK = re.compile(r"ACTIVE ([0-9.]+)s after HUP")


def reloads(d: Daemon, n: int) -> list[float]:
    """Send `n` HUPs one after the other; return each HUP -> ACTIVE time."""
    before = len(HUP_TOOK.findall(d.log()))
    for i in range(n):
        d.send(signal.SIGHUP)
        d.wait_log(HUP_TOOK.pattern, count=before + i + 1, timeout=30)
    return [float(x) for x in HUP_TOOK.findall(d.log())[before:]]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hold(address: str, n: int) -> list[socket.socket]:
    host, _, port = address.rpartition(":")
    return [socket.create_connection((host, int(port)), timeout=10) for _ in range(n)]


def run_once(n_reloads: int, n_conns: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cfg = echo_config(port, count=2)
        cfg["workers"] = {"count": 2, "app": "http"}
        with Daemon(Path(tmp), cfg, wrap=("prlimit", "--nofile=1024:1024")).start() as d:
            reloads(d, 1)  # warm-up, not measured
            quiet = reloads(d, n_reloads)
            held = hold(cfg["metrics"]["listen"], n_conns)  # type: ignore[index]
            try:
                flood = reloads(d, n_reloads)
                t0 = time.monotonic()
                out = subprocess.run([sys.executable, "-m", "upgraderd", "status", "--pidfile", str(d.pidfile)],
                                     cwd=ROOT, capture_output=True, text=True, timeout=30)
                status_s = time.monotonic() - t0
                fds = len(os.listdir(f"/proc/{d.pid}/fd"))
                c0 = cpu_seconds(d.pid)
                time.sleep(2.0)  # the idle window being measured
                idle_cpu = (cpu_seconds(d.pid) - c0) / 2.0
            finally:
                for s in held:
                    s.close()
            refused = value(scrape(cfg), "upgraderd_metrics_connections_refused_total")
    return {"quiet_p50": statistics.median(quiet), "flood_p50": statistics.median(flood),
            "ratio": statistics.median(flood) / statistics.median(quiet), "status_s": status_s,
            "status_ok": float(out.returncode == 0), "fds": fds, "idle_cpu": idle_cpu, "refused": refused}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reloads", type=int, default=5)
    ap.add_argument("--connections", type=int, default=2000)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    runs = [run_once(args.reloads, args.connections) for _ in range(args.repeats)]
    print(f"{args.repeats} repeats x {args.reloads} reloads per phase, {args.connections} idle metrics "
          f"connections, master at nofile 1024 (medians over repeats)")
    print(f"{'metric':<34} {'median':>10}   per repeat")
    for key, label in [("quiet_p50", "HUP->ACTIVE quiet (s)"), ("flood_p50", "HUP->ACTIVE flood (s)"),
                       ("ratio", "flood / quiet"), ("status_s", "`status` during flood (s)"),
                       ("status_ok", "`status` exit 0"), ("fds", "master fds during flood"),
                       ("idle_cpu", "master CPU, idle, flood (cores)"), ("refused", "connections refused")]:
        vals = [r[key] for r in runs]
        print(f"{label:<34} {statistics.median(vals):>10.3f}   {' '.join(f'{v:.3f}' for v in vals)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
