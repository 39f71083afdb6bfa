"""Measure: the share of new connections a canary gets during its window, per socket mode.

Runs the real daemon with the built-in http app (its answer names the
generation that served it), `workers.count` workers, and a canary of
`canary.workers`, under new-connection HTTP load (a connection per request).
During each canary's window (from the log line "canary serving" to the end of
the window, a `--window` long) it counts the answers by generation; the
canary is then rolled back with `upgraderd rollback` and the next round
starts. Every failed request of the whole run is reported too.

    .venv/bin/python -m bench.canary_share [--repeats 3] [--count 4] [--canary 1] [--window 4]

It prints, per mode, each round's canary share and the median, beside the
two figures docs/rollouts.md gives: canary/(count+canary) for shared mode,
and canary/count (the most it can get) for reuseport mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.loadgen import Load
from tests.support.upgraderd_proc import ROOT, Daemon, echo_config, free_port, wait_until


def one_mode(mode: str, repeats: int, count: int, canary: int, window: float) -> dict[str, object]:
    port = free_port()
    cfg = echo_config(port, count=count)
    cfg["listeners"] = [{"name": "web", "host": "127.0.0.1", "port": port, "mode": mode}]
    cfg["workers"] = {"count": count, "app": "http"}
    shares: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, Daemon(Path(tmp), cfg).start() as d:
        load = Load("127.0.0.1", port, threads=8, max_seconds=60 + repeats * (window + 10)).start("http")
        assert load.wait_for_ok(200, timeout=30)
        d.write_config({**cfg, "rollout": {"strategy": "canary",
                                           "canary": {"workers": canary, "window": f"{window + 60:g}s"}}})
        for r in range(repeats):
            gen = 2 + r
            reload = subprocess.Popen([sys.executable, "-m", "upgraderd", "reload", "--pidfile", str(d.pidfile)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
            d.wait_log(rf"rollout: generation {gen} canary serving", timeout=30)
            mark = load.mark()
            time.sleep(window)   # the measured span itself, not a stand-in for a condition
            seen = load.answers_since(mark)
            subprocess.run([sys.executable, "-m", "upgraderd", "rollback", "--pidfile", str(d.pidfile)],
                           check=True, cwd=ROOT, capture_output=True)
            reload.wait(30)
            wait_until(lambda: len((d.status() or {"generations": []})["generations"]) == 1, 30,
                       "the canary to retire")
            by_gen = {g: sum(n for body, n in seen.items() if body.startswith(f"generation={g} "))
                      for g in (gen, 1)}
            shares.append(by_gen[gen] / max(1, sum(by_gen.values())))
        result = load.stop()
    return {"mode": mode, "shares": [round(s, 3) for s in shares], "median": round(statistics.median(shares), 3),
            "failures": result.failures, "ok": result.ok}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--canary", type=int, default=1)
    p.add_argument("--window", type=float, default=4.0)
    a = p.parse_args()
    print(json.dumps({"shared (expected about)": round(a.canary / (a.count + a.canary), 3),
                      "reuseport (at most)": round(a.canary / a.count, 3)}))
    for mode in ("shared", "reuseport"):
        print(json.dumps(one_mode(mode, a.repeats, a.count, a.canary, a.window)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
