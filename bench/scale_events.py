"""Benchmark: the master's CPU per worker event (READY, exit) as generations grow.

The real `Master` with the fake process layer and notify socket of
tests/support/fakes.py (no processes, no sleeps; real listeners on 127.0.0.1):
for each count N, generation 1 starts N workers, then one pass takes N READY
messages; a HUP starts generation 2, whose N READY promote it and drain
generation 1; then one pass reaps generation 1's N exits; then generation 3's
READY arrive one per pass (as they trickle in on a real machine), which
also counts what every pass does (the snapshot, steering, settling). Each phase's wall
time is the median over --repeats runs, also given per event.

    .venv/bin/python -m bench.scale_events [--counts 64 256 1024] [--repeats 5]

O(1) work per event shows as a flat per-event time; O(N) per event as a
per-event time that grows with N.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import time
from pathlib import Path

from tests.support.fakes import FakeNotify, FakeProcessAPI, fake_system
from tests.support.upgraderd_proc import free_port
from upgraderd.core.master import Master


def one_run(count: int, where: Path) -> dict[str, float]:
    """Return the seconds one pass takes for N READY (gen 1 and 2) and N exits."""
    path = where / "u.yaml"
    path.write_text(f"""\
listeners:
  - {{name: web, port: {free_port()}, mode: shared}}
workers: {{count: {count}, command: [/bin/true]}}
metrics: {{listen: null}}
kernel: {{tcp_migrate_req: ignore}}
""")
    procs, note, clock = FakeProcessAPI(), FakeNotify(), [100.0]
    system = fake_system(procs, note)
    m = Master(str(path), system, clock=lambda: clock[0])
    out = {}
    try:
        t0 = time.perf_counter()
        m.start()
        out["start"] = time.perf_counter() - t0
        note.ready(*procs.pids(1))
        t0 = time.perf_counter()
        m.step(set())
        out["ready"] = time.perf_counter() - t0
        assert m.active is not None and m.active.number == 1
        m.step({signal.SIGHUP})
        note.ready(*procs.pids(2))
        t0 = time.perf_counter()
        m.step(set())
        out["ready+drain"] = time.perf_counter() - t0
        assert m.active is not None and m.active.number == 2
        for pid in procs.pids(1):
            procs.exit(pid)
        t0 = time.perf_counter()
        m.step(set())
        out["exits"] = time.perf_counter() - t0
        assert [g.number for g in m.generations] == [2]
        m.step({signal.SIGHUP})   # generation 3: each READY in a pass of its own, as they trickle in
        t0 = time.perf_counter()
        for pid in procs.pids(3):
            note.ready(pid)
            m.step(set())
        out["trickle"] = time.perf_counter() - t0
        assert m.active is not None and m.active.number == 3
    finally:
        system.listeners.close_all()
        system.probes.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"{'workers':>8} {'start':>9} {'N READY':>9} {'per READY':>10} {'N READY+drain':>14} "
          f"{'N exits':>9} {'per exit':>9} {'per READY pass':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.counts:
            runs = [one_run(n, Path(tmp)) for _ in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"{n:>8} {med['start'] * 1e3:>7.1f}ms {med['ready'] * 1e3:>7.1f}ms "
                  f"{med['ready'] / n * 1e6:>8.1f}us {med['ready+drain'] * 1e3:>12.1f}ms "
                  f"{med['exits'] * 1e3:>7.1f}ms {med['exits'] / n * 1e6:>7.1f}us "
                  f"{med['trickle'] / n * 1e6:>13.1f}us", flush=True)


if __name__ == "__main__":
    main()
