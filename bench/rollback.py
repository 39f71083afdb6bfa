"""Benchmark: `upgraderd rollback` to the kept template against a HUP, in the same run.

One daemon per repeat serves the built-in echo app with prefork templates and
`rollout.keep_previous`, under connection-per-request echo load (4 client
threads). Each round sends a HUP (a fresh template is exec'd and imports the
app, then forks the workers) and waits until it settled, then runs the real
`upgraderd rollback` (the previous release's kept template forks the workers:
no exec, no import). Both figures are the master's own, from its log: HUP ->
ACTIVE ("ACTIVE Xs after HUP") and rollback -> ACTIVE ("ACTIVE Xs after
`upgraderd rollback`"), from the signal to the last worker's READY=1.

The kept template's memory is read from /proc/PID/smaps_rollup after the last
rollback, when it serves no generation: PSS (its pages divided among the
processes that share them) is what keeping it costs; RSS for scale.

    .venv/bin/python -m bench.rollback [--repeats 3] [--rounds 5] [--workers 4]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.loadgen import Load
from tests.support.upgraderd_proc import Daemon, echo_config, free_port


def memory(pid: int) -> tuple[int, int]:
    """Return (PSS, RSS) of `pid` in KiB, from /proc/PID/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    return fields["Pss"], fields["Rss"]


def rollback(d: Daemon) -> None:
    r = subprocess.run([sys.executable, "-m", "upgraderd", "rollback", "--pidfile", str(d.pidfile)],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise SystemExit(f"upgraderd rollback failed: {r}")


def run_once(rounds: int, workers: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cfg = echo_config(port, count=workers, workers={"count": workers, "app": "echo", "prefork": True},
                          rollout={"keep_previous": "10m"})
        with Daemon(Path(tmp), cfg).start() as d:
            load = Load("127.0.0.1", port, threads=4, max_seconds=30 + 20 * rounds).start("echo")
            if not load.wait_for_ok(200, timeout=30):
                raise SystemExit("the load did not start")
            for _ in range(rounds):
                d.hup()
                d.settled()
                rollback(d)
            load.wait_for_ok(load.result.ok + 200, timeout=30)
            result = load.stop()
            status = d.status() or {}
            kept = (status.get("previous") or {}).get("template")
            pss, rss = memory(int(kept)) if kept else (0, 0)
            log = d.log()
    hup = [float(x) for x in re.findall(r"ACTIVE ([0-9.]+)s after HUP", log)]
    back = [float(x) for x in re.findall(r"ACTIVE ([0-9.]+)s after `upgraderd rollback`", log)]
    return {"hups": len(hup), "rollbacks": len(back), "ok": result.ok, "failures": sum(result.failures.values()),
            "hup_p50": statistics.median(hup), "rollback_p50": statistics.median(back),
            "ratio": statistics.median(back) / statistics.median(hup), "pss_kib": pss, "rss_kib": rss}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.rollback", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="HUP + rollback pairs per repeat")
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    cols = ["hups", "rollbacks", "ok", "failures", "hup_p50", "rollback_p50", "ratio", "pss_kib", "rss_kib"]
    print(f"{args.repeats} repeats of {args.rounds} x (HUP, then `upgraderd rollback`), echo app, prefork, "
          f"{args.workers} workers, 4 client threads, new TCP connection per round trip")
    print("".join(f"{c:>13}" for c in cols))
    runs = [run_once(args.rounds, args.workers) for _ in range(args.repeats)]
    for r in runs:
        print("".join(f"{r[c]:>13.3f}" if isinstance(r[c], float) else f"{r[c]:>13}" for c in cols))
    med = {c: statistics.median(r[c] for r in runs) for c in cols}
    print("median " + " ".join(f"{c}={med[c]:.3f}" for c in ("hup_p50", "rollback_p50", "ratio", "pss_kib",
                                                              "rss_kib")))
    print(f"failures over all runs: {sum(r['failures'] for r in runs)} of {sum(r['ok'] for r in runs)} ok")


if __name__ == "__main__":
    main()
