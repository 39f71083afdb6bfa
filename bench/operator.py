"""Benchmark: what the operator's commands cost, and what `threads: N` buys the built-in echo.

1. `upgraderd reload`: the wall time of the whole command (interpreter start,
   pidfile and status file, SIGHUP, waiting for the outcome) next to the
   master's own HUP -> ACTIVE time for the same reload, read from its log;
   their difference is the client's overhead. `upgraderd check` and
   `upgraderd status` are timed the same way.
2. Round trips per second of connection-per-request echo load (8 client
   threads) against 1 worker with 1 and with 4 threads, and against 4
   single-threaded workers. Ratios are taken within each run.

Each figure is the median over `--repeats` runs.

Run it from the repository root:

    .venv/bin/python -m bench.operator [--repeats 5] [--seconds 4]
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support import ROOT
from tests.support.loadgen import Load
from tests.support.upgraderd_proc import Daemon, echo_config, free_port


def timed(*args: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "upgraderd", *args], capture_output=True, text=True, cwd=ROOT)
    took = time.perf_counter() - t0
    assert r.returncode == 0, r
    return took


def commands(repeats: int) -> list[tuple[str, float]]:
    with tempfile.TemporaryDirectory() as tmp, Daemon(Path(tmp), echo_config(free_port(), count=2)).start() as d:
        pidfile = str(d.pidfile)
        reload_s, master_s, status_s, check_s = [], [], [], []
        for i in range(repeats):
            reload_s.append(timed("reload", "--pidfile", pidfile))
            found = re.findall(r"ACTIVE ([0-9.]+)s after HUP", d.log())
            assert len(found) == i + 1
            master_s.append(float(found[-1]))
            status_s.append(timed("status", "--pidfile", pidfile))
            check_s.append(timed("check", "-c", str(d.config_path)))
        d.send(signal.SIGTERM)
    overhead = [r - m for r, m in zip(reload_s, master_s)]
    return [("upgraderd reload (whole command)", statistics.median(reload_s)),
            ("  master: HUP -> ACTIVE", statistics.median(master_s)),
            ("  client overhead", statistics.median(overhead)),
            ("upgraderd status", statistics.median(status_s)),
            ("upgraderd check", statistics.median(check_s))]


def throughput(count: int, threads: int, seconds: float) -> float:
    port = free_port()
    cfg = echo_config(port, count=count)
    cfg["workers"] = {"count": count, "app": "echo", "threads": threads}
    with tempfile.TemporaryDirectory() as tmp, Daemon(Path(tmp), cfg).start():
        warm = Load("127.0.0.1", port, threads=8, max_seconds=1).start("echo")
        time.sleep(1)  # a fixed warm-up period, not a wait for a condition
        warm.stop()
        load = Load("127.0.0.1", port, threads=8, max_seconds=seconds + 5).start("echo")
        t0 = time.monotonic()
        time.sleep(seconds)  # the measurement window
        result = load.stop()
        took = time.monotonic() - t0
        assert result.failures == {}, result.failures
        return result.ok / took


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.operator", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()

    print(f"| command ({args.repeats} runs) | median seconds |\n|---|---|")
    for name, value in commands(args.repeats):
        print(f"| {name} | {value:.3f} |")

    layouts = [(1, 1), (1, 4), (4, 1)]
    runs: list[list[float]] = []
    for _ in range(args.repeats):
        runs.append([throughput(c, t, args.seconds) for c, t in layouts])
    print(f"\n| workers x threads ({args.repeats} runs, {args.seconds:g}s each) "
          "| round trips/s (median) | ratio to 1 x 1 (median of per-run ratios) |\n|---|---|---|")
    for i, (c, t) in enumerate(layouts):
        med = statistics.median(r[i] for r in runs)
        ratio = statistics.median(r[i] / r[0] for r in runs)
        print(f"| {c} x {t} | {med:.0f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
