"""Benchmark: persistent connections across reloads, with connection hand-off on and off.

Each run starts one daemon (4 workers, reuseport, `drain.timeout: 10s`), opens
N persistent connections (echo: sequence-numbered messages checked in order,
never reconnected; http: keep-alive requests, reconnecting only after a
`Connection: close`), measures a steady phase, then sends a HUP every
`--interval` seconds. It reports, per app and `drain.handoff` setting:
- lost: round trips that failed (echo: also wrong or out of order; a failed
  echo connection stops, so at most one per connection), and reconnects;
- ports: whether every echo connection kept its local port to the end;
- retire p50/p95: from the successor turning ACTIVE to the old generation
  RETIRED (the master's "DRAINING -> RETIRED after" log);
- drops: old workers that lost a taker on the way (it refused, timed out or
  vanished; its connections went to the others), summed over the reloads;
- handoff p50/p95: how long one old worker took to hand all its connections
  over, from its drain start (the worker's own log line), in seconds;
- ratio: round trips per second during the reloads / during the steady phase,
  in the same run;
- jain: Jain's index of the connections held by the new generation's workers,
  measured after each reload settled (median and minimum over the reloads).
Tables show the median over repeats, and the worst `lost` of any repeat.

    .venv/bin/python -m bench.handoff [--repeats 3] [--hups 20] [--conns 64]
    .venv/bin/python -m bench.handoff --soak 1000 --interval 0.5   # losses and fd counts
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path


from tests.support.upgraderd_proc import Daemon, echo_config, free_port  # noqa: E402
from tests.support.persistent import Streams, generation_pids, jain, worker_connections  # noqa: E402


def fairness_now(d: Daemon, port: int, seen: set[int]) -> float | None:
    """Return Jain's index over the newest generation whose predecessor retired, once per generation."""
    retired = [int(n) for n in re.findall(r"generation (\d+) DRAINING -> RETIRED", d.log())]
    if not retired or max(retired) + 1 in seen:
        return None
    generation = max(retired) + 1
    if f"generation {generation} ACTIVE -> DRAINING" in d.log():
        return None  # it is giving its connections away already: not a settled spread
    pids = generation_pids(d.workers(), generation)
    counts = worker_connections(set(pids.values()), port)
    if len(counts) != 4 or not sum(counts.values()):
        return None
    seen.add(generation)
    return jain(list(counts.values()))


def run_once(app: str, handoff: str, conns: int, hups: int, interval: float, steady: float,
             pause: float) -> dict[str, float]:
    port = free_port()
    cfg = echo_config(port, workers={"count": 4, "app": app}, drain={"timeout": "10s", "handoff": handoff})
    with tempfile.TemporaryDirectory() as tmp, Daemon(Path(tmp), cfg).start() as d:
        streams = Streams(port, conns, kind=app, pause=pause, max_seconds=steady + hups * interval + 60).start()
        streams.wait_ok(conns * 5)
        ok0, t0 = streams.result.ok, time.monotonic()
        time.sleep(steady)  # the steady phase being measured
        steady_rate = (streams.result.ok - ok0) / (time.monotonic() - t0)
        ok1, t1 = streams.result.ok, time.monotonic()
        fairness: list[float] = []
        seen: set[int] = set()
        for _ in range(hups):
            start = time.monotonic()
            d.hup()
            time.sleep(max(0.0, start + interval - 0.05 - time.monotonic()))  # the HUP interval under test
            if handoff == "auto" and (index := fairness_now(d, port, seen)) is not None:
                fairness.append(index)
        reload_rate = (streams.result.ok - ok1) / (time.monotonic() - t1)
        result = streams.stop()
        log = d.log()
    retire = sorted(float(x) for x in re.findall(r"DRAINING -> RETIRED after ([0-9.]+)s", log))
    moves = sorted(int(x) for x in re.findall(r"connection\(s\) to \d+ worker\(s\) in (\d+) ms", log))
    # A giver's line names the takers left at the end: fewer than 4 means one failed (slow, gone).
    drops = sum(int(n) < 4 for n in re.findall(r"connection\(s\) to (\d+) worker\(s\)", log))
    return {
        "lost": sum(result.failures.values()), "reconnects": result.reconnects,
        "ports": float(result.ports_kept), "retired": len(retire),
        "retire_p50": statistics.median(retire) if retire else float("nan"),
        "retire_p95": retire[min(len(retire) - 1, int(0.95 * len(retire)))] if retire else float("nan"),
        "drops": drops,
        "handoff_p50": statistics.median(moves) / 1000 if moves else float("nan"),
        "handoff_p95": moves[min(len(moves) - 1, int(0.95 * len(moves)))] / 1000 if moves else float("nan"),
        "steady_rps": steady_rate, "ratio": reload_rate / steady_rate,
        "jain_med": statistics.median(fairness) if fairness else float("nan"),
        "jain_min": min(fairness) if fairness else float("nan"),
    }


def fd_count(pid: int) -> int:
    """Return how many fds `pid` has open (0 if it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def soak(reloads: int, conns: int, interval: float) -> None:
    """Reload `reloads` times under persistent echo load; report losses and fd counts."""
    port = free_port()
    cfg = echo_config(port, drain={"timeout": "10s", "handoff": "auto"})
    with tempfile.TemporaryDirectory() as tmp, Daemon(Path(tmp), cfg).start() as d:
        streams = Streams(port, conns, pause=0.01, max_seconds=reloads * interval * 4 + 120).start()
        streams.wait_ok(conns * 5)
        before = (fd_count(d.pid), sorted(fd_count(p) for p in d.workers()))
        for _ in range(reloads):
            start = time.monotonic()
            d.hup()
            time.sleep(max(0.0, start + interval - time.monotonic()))  # the HUP interval under test
        final = d.settled()
        d.wait_log(rf"generation {final - 1} DRAINING -> RETIRED", timeout=30)
        after = (fd_count(d.pid), sorted(fd_count(p) for p in d.workers()))
        result = streams.stop()
        handed = len(re.findall(r"handed \d+ of", d.log()))
    print(f"soak: {reloads} HUPs {interval:g} s apart -> {final - 1} reloads, {conns} persistent echo "
          f"connections, {result.ok} round trips, lost {sum(result.failures.values())} "
          f"{dict(result.failures)}, ports kept {result.ports_kept}, {handed} worker hand-offs")
    print(f"soak: fds master {before[0]} -> {after[0]}, workers {before[1]} -> {after[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hups", type=int, default=20)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between HUPs")
    ap.add_argument("--steady", type=float, default=5.0, help="seconds of the steady phase")
    ap.add_argument("--apps", default="echo,http")
    ap.add_argument("--pause", type=float, default=0.01, help="seconds each client waits between round trips")
    ap.add_argument("--soak", type=int, default=0, metavar="N",
                    help="instead: N reloads under persistent echo load; report losses and fd counts")
    args = ap.parse_args()
    if args.soak:
        soak(args.soak, args.conns, args.interval)
        return
    cols = ["lost", "reconnects", "ports", "retired", "retire_p50", "retire_p95", "drops", "handoff_p50",
            "handoff_p95",
            "steady_rps", "ratio",
            "jain_med", "jain_min"]
    print(f"median of {args.repeats} runs; {args.conns} persistent connections ({args.pause * 1000:g} ms "
          f"between round trips), 4 workers, {args.hups} HUPs {args.interval:g} s apart, drain.timeout 10s; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'app':<6}{'handoff':<9}" + "".join(f"{c:>12}" for c in cols))
    for app in args.apps.split(","):
        for handoff in ("auto", "off"):
            runs = [run_once(app, handoff, args.conns, args.hups, args.interval, args.steady, args.pause)
                    for _ in range(args.repeats)]
            med = {c: statistics.median(r[c] for r in runs) for c in cols}
            med["lost"] = max(r["lost"] for r in runs)  # the worst run, not the median
            med["ports"] = min(r["ports"] for r in runs)
            print(f"{app:<6}{handoff:<9}" + "".join(
                f"{med[c]:>12.0f}" if c in ("lost", "reconnects", "ports", "retired", "drops", "steady_rps")
                else f"{med[c]:>12.3f}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
