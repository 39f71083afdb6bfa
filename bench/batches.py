"""Measure: peak worker count and peak memory of a reload, all at once against batches.

Runs the real daemon with the built-in echo app and `--count` workers under a
small load (persistent echo clients, which the hand-off moves, and clients
with a new connection per round trip), then reloads it again and again with
`upgraderd reload`, cycling through the strategies in one run: all-at-once,
batches of 1, batches of 2 (pause `--pause`). During each reload a sampler
thread reads, every `--every` seconds, the master's live children (draining
workers included until they are reaped) and the sum of their PSS
(/proc/PID/smaps_rollup). It prints one table: per strategy, the median over
`--repeats` reloads of the peak worker count, the peak PSS, the peak PSS over
the steady PSS just before the reload (same reload), and the reload's
duration; and every failed client round trip of the run.

    .venv/bin/python -m bench.batches [--repeats 5] [--count 8] [--pause 0.2] [--prefork]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.loadgen import Load
from tests.support.persistent import Streams
from tests.support.upgraderd_proc import ROOT, Daemon, children, echo_config, free_port, wait_until

STRATEGIES: list[tuple[str, dict[str, Any]]] = [
    ("all-at-once", {"strategy": "all-at-once"}),
    ("batches of 1", {"strategy": "batches", "batches": {"size": 1}}),
    ("batches of 2", {"strategy": "batches", "batches": {"size": 2}}),
]


def pss_kib(pid: int) -> int:
    """Return the PSS of `pid` in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Sampler:
    """Sample the master's children and their PSS every `every` seconds until stopped (bounded)."""

    def __init__(self, master: int, every: float, max_seconds: float = 300.0) -> None:
        self.master, self.every, self.deadline = master, every, time.monotonic() + max_seconds
        self.peak_count, self.peak_pss, self.samples = 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            pids = children(self.master)
            self.peak_count = max(self.peak_count, len(pids))
            self.peak_pss = max(self.peak_pss, sum(pss_kib(p) for p in pids))
            self.samples += 1
            time.sleep(self.every)

    def stop(self) -> Sampler:
        self._stop.set()
        self._thread.join(10)
        return self


def steady_pss(master: int) -> int:
    """Return the PSS sum of the master's children now (KiB)."""
    return sum(pss_kib(p) for p in children(master))


def run(a: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    port = free_port()
    workers: dict[str, Any] = {"count": a.count, "app": "echo", "prefork": a.prefork}
    base = echo_config(port, count=a.count, workers=workers, ready={"timeout": "60s"}, drain={"timeout": "10s"})
    rows: dict[str, list[dict[str, float]]] = {name: [] for name, _ in STRATEGIES}
    with tempfile.TemporaryDirectory() as tmp, Daemon(Path(tmp), base).start() as d:
        streams = Streams(port, a.persistent, max_seconds=3600).start()
        load = Load("127.0.0.1", port, threads=a.threads, max_seconds=3600).start("echo")
        assert streams.wait_ok(200) and load.wait_for_ok(200, timeout=30)
        release = 1
        for _ in range(a.repeats):
            for name, rollout in STRATEGIES:
                release += 1
                if "batches" in rollout:
                    rollout = {**rollout, "batches": {**rollout["batches"], "pause": f"{a.pause:g}s"}}
                d.write_config({**base, "workers": {**workers, "env": {"RELEASE": str(release)}},
                                "rollout": rollout})
                before = steady_pss(d.pid)
                sampler = Sampler(d.pid, a.every).start()
                t0 = time.monotonic()
                r = subprocess.run([sys.executable, "-m", "upgraderd", "reload", "--pidfile", str(d.pidfile)],
                                   capture_output=True, text=True, cwd=ROOT, timeout=300)
                took = time.monotonic() - t0
                assert r.returncode == 0, r
                wait_until(lambda: [g["state"] for g in (d.status() or {"generations": []})["generations"]]
                           == ["ACTIVE"], 60, "the old generation to retire")
                s = sampler.stop()
                rows[name].append({"peak_workers": s.peak_count, "peak_pss_mib": s.peak_pss / 1024,
                                   "vs_steady": s.peak_pss / max(1, before), "reload_s": took,
                                   "samples": s.samples})
        moved, result = streams.stop(), load.stop()
    print(json.dumps({"persistent": {"ok": moved.ok, "failures": dict(moved.failures),
                                     "ports_kept": moved.ports_kept},
                      "new_connections": {"ok": result.ok, "failures": result.failures}}))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--pause", type=float, default=0.2)
    p.add_argument("--every", type=float, default=0.01, help="sampling interval, seconds")
    p.add_argument("--persistent", type=int, default=16)
    p.add_argument("--threads", type=int, default=4, help="new-connection client threads")
    p.add_argument("--prefork", action="store_true", help="fork the workers from a template per generation")
    a = p.parse_args()
    rows = run(a)
    templates = ", the templates included" if a.prefork else ""
    print(f"{a.count} echo workers{' (prefork)' if a.prefork else ''}, median of {a.repeats} reloads each, "
          f"pause {a.pause:g}s, sampled every {a.every:g}s (children of the master{templates})")
    print("| strategy | peak workers | peak PSS, MiB | peak / steady PSS | reload, s |")
    print("|---|---|---|---|---|")
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("peak_workers", "peak_pss_mib", "vs_steady",
                                                                   "reload_s")}
        print(f"| {name} | {med['peak_workers']:g} (max {max(r['peak_workers'] for r in runs):g}) | "
              f"{med['peak_pss_mib']:.1f} | {med['vs_steady']:.2f} | {med['reload_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
