"""Benchmark: client errors while one reuseport slot crash-loops, before and after the master's rescue.

Each run is tests/support/scenarios/crashloop.py in a network namespace of its
own (`unshare -n`, as root) at net.ipv4.tcp_migrate_req=0: 4 slots serve echo
under new-connection-per-round-trip load (3 s client timeout); slot 2's
workers then crash 0.3 s after each start until the slot is FATAL and its
socket closes. Two codes, interleaved run by run so that machine noise
mostly cancels:

- `before`: the master of `--before` (default: the commit this branch
  started from), run from an exported copy of its `upgraderd` package: what
  queued on the slot's socket waits through the back-off and is reset at
  the FATAL close;
- `after`: this tree; the master accepts what queued on the dead slot's
  socket and hands it to the READY slots over their hand-off channels.

The workers are the same in both (this tree's; the built-in echo on slots 0,
1 and 3). Run from the repository root, as root:

    .venv/bin/python -m bench.crashloop [--runs 5] [--threads 4] [--backoff 0.2] [--before REV]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench.restart import export
from tests.support import ROOT


def run(tree: Path, threads: int, backoff: float) -> dict[str, Any]:
    """Run the scenario once with the master of `tree`; return its JSON line."""
    env = {**os.environ, "HOST_NETNS": os.readlink("/proc/self/ns/net")}
    with tempfile.TemporaryDirectory(prefix="crashloop-") as work:
        proc = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.support.scenarios.crashloop",
                               work, str(threads), str(backoff), str(tree)],
                              capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"scenario failed:\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=4, help="client threads (a new connection per round trip)")
    ap.add_argument("--backoff", type=float, default=0.2, help="restart.backoff in seconds (max: 1 s or this)")
    ap.add_argument("--before", default="9243f21", help="git revision of the 'before' master")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (unshare -n, and tcp_migrate_req in that namespace)")
    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        old = export(args.before, Path(tmp))
        for i in range(args.runs):
            for name, tree in (("before", old), ("after", ROOT)):
                out = run(tree, args.threads, args.backoff)
                results[name].append(out)
                print(f"run {i + 1} {name}: {json.dumps(out)}", file=sys.stderr, flush=True)
    print(f"{args.runs} runs each, {args.threads} client threads, restart.backoff {args.backoff:g}s, "
          f"tcp_migrate_req=0; 'before' = {args.before}")
    print("| code | client errors per run | reset / timeout, all runs | round trips ok, median "
          "| rescued by the master, median | slowest round trip, median |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        fails = [Counter(r["failures"]) for r in runs]
        errors = [sum(f.values()) for f in fails]
        print(f"| {name} | {', '.join(map(str, errors))} | {sum(f['reset'] for f in fails)} / "
              f"{sum(f['timeout'] for f in fails)} | {statistics.median(int(r['ok']) for r in runs):,.0f} "
              f"| {statistics.median(int(r['rescued']) for r in runs):.0f} "
              f"| {statistics.median(float(r['max_latency']) for r in runs):.2f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
