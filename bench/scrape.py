"""Benchmark: scrape time after 10 and after 2,000 worker replacements.

Each replacement is a real process that writes real worker metric files
with the built-in workers' own `ConnectionMetrics` code (forked from one
factory process, see tests/support/mpworkers.py, so 2,000 of them take seconds), then
exits and is handled as the master handles a reaped worker:

- `fold` (upgraderd): `WorkerFiles.fold(pid)`, which archives the dead
  worker's counters and deletes its files;
- `mark_process_dead only` (what prometheus-client's documentation prescribes
  and other tools do): the dead worker's counter file stays, because deleting
  it would reset the counters.

Four workers stay alive throughout. A scrape is the collection and text
encoding of the workers' metrics, exactly what /metrics does for them,
timed `--scrapes` times; the table shows the median over `--repeats` runs of
the median scrape, the ratio 2,000 / 10 taken within each run, and the
median time the master spends on one reaped worker's files.

Run it from the repository root:

    .venv/bin/python -m bench.scrape [--repeats 3] [--scrapes 15] [--replacements 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import mark_process_dead

from tests.support.mpworkers import WorkerFactory
from upgraderd.metrics.multiproc import WorkerFiles
from upgraderd.metrics.telemetry import WorkerCollector

LIVE_WORKERS = 4
EARLY = 10


def time_scrapes(registry: CollectorRegistry, n: int) -> float:
    """Return the median wall time of `n` scrapes, in milliseconds."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        generate_latest(registry)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def run_once(strategy: str, replacements: int, scrapes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        files = WorkerFiles(tmp)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkerCollector(files))
        factory = WorkerFactory(tmp)
        try:
            for _ in range(LIVE_WORKERS):
                factory.run(connections=100, nbytes=64, still_open=2)  # never reaped: "alive"
            out: dict[str, float] = {}
            handling: list[float] = []
            for done in range(1, replacements + 1):
                pid = factory.run(connections=10, nbytes=64)
                t0 = time.perf_counter()
                if strategy == "fold":
                    files.fold(pid)
                else:
                    mark_process_dead(pid, tmp)
                handling.append((time.perf_counter() - t0) * 1000)
                if done in (EARLY, replacements):
                    out[f"ms_{done}"] = time_scrapes(registry, scrapes)
                    out[f"files_{done}"] = len(os.listdir(tmp))
        finally:
            factory.close()
            files.close()
    out["ratio"] = out[f"ms_{replacements}"] / out[f"ms_{EARLY}"]
    out["reap_ms"] = statistics.median(handling)
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scrape", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scrapes", type=int, default=15)
    p.add_argument("--replacements", type=int, default=2000)
    args = p.parse_args()
    n = args.replacements
    print(f"{LIVE_WORKERS} live workers; scrape = collect + encode the workers' metrics; "
          f"median of {args.scrapes} scrapes, then median of {args.repeats} runs\n")
    print(f"| dead workers handled by | files after {EARLY} | files after {n} | scrape after {EARLY} (ms) "
          f"| scrape after {n} (ms) | ratio {n}/{EARLY} | master's cost per reaped worker (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for strategy in ("fold", "mark_process_dead only"):
        runs = [run_once(strategy, n, args.scrapes) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {strategy} | {med[f'files_{EARLY}']:.0f} | {med[f'files_{n}']:.0f} | {med[f'ms_{EARLY}']:.2f} "
              f"| {med[f'ms_{n}']:.2f} | {med['ratio']:.2f} | {med['reap_ms']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
