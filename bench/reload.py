"""Benchmark: hot reloads under connection-per-request echo load.

For each socket mode, each repeat runs two phases against one daemon: a
quiet phase (load only) and a reload phase (load plus a HUP every 100 ms),
of equal length. It reports failures, round trips per second, the ratio of
the two phases (taken in the same run, so machine noise mostly cancels), and
HUP -> ACTIVE latency. Tables show the median over repeats.

Run it from the repository root:

    .venv/bin/python -m bench.reload [--repeats 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

from tests.support.loadgen import Load
from tests.support.upgraderd_proc import Daemon, echo_config, free_port


INTERVAL = 0.1


def phase(port: int, seconds: float, daemon: Daemon | None) -> tuple[float, dict[str, int]]:
    load = Load("127.0.0.1", port, threads=6, max_seconds=seconds + 30).start("echo")
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if daemon is not None:
            daemon.hup()
        time.sleep(INTERVAL)  # the HUP interval being benchmarked
    result = load.stop()
    return result.ok / (time.monotonic() - t0), result.failures


def run_once(mode: str, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        with Daemon(Path(tmp), echo_config(port, mode=mode)).start() as d:
            phase(port, 1.0, None)  # warm-up, not measured
            quiet_rate, quiet_fail = phase(port, seconds, None)
            busy_rate, busy_fail = phase(port, seconds, d)
            d.settled()
            log = d.log()
    took = [float(x) for x in re.findall(r"ACTIVE ([0-9.]+)s after HUP", log)]
    boot = [float(x) for x in re.findall(r"STARTING -> ACTIVE after ([0-9.]+)s", log)]
    return {
        "reloads": len(took), "failures": sum(quiet_fail.values()) + sum(busy_fail.values()),
        "quiet_rps": quiet_rate, "reload_rps": busy_rate, "ratio": busy_rate / quiet_rate,
        "hup_p50": statistics.median(took), "hup_max": max(took),
        "start_p50": statistics.median(boot), "start_max": max(boot),
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.reload", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between HUPs")
    args = ap.parse_args()
    global INTERVAL
    INTERVAL = args.interval
    cols = ["reloads", "failures", "quiet_rps", "reload_rps", "ratio", "hup_p50", "hup_max",
            "start_p50", "start_max"]
    print(f"median of {args.repeats} runs, {args.seconds:g}s per phase, 6 client threads, "
          f"new TCP connection per echo round trip, HUP every {args.interval * 1000:g} ms")
    print(f"{'mode':<10}" + "".join(f"{c:>11}" for c in cols))
    for mode in ("reuseport", "shared"):
        runs = [run_once(mode, args.seconds) for _ in range(args.repeats)]
        med = {c: statistics.median(r[c] for r in runs) for c in cols}
        med["failures"] = max(r["failures"] for r in runs)  # the worst run, not the median
        print(f"{mode:<10}" + "".join(
            f"{med[c]:>11.0f}" if c.endswith("rps") or c in ("reloads", "failures")
            else f"{med[c]:>11.3f}" for c in cols))
    print("failures = total over all runs' worst run; times in seconds; ratio = reload_rps / quiet_rps")


if __name__ == "__main__":
    main()
