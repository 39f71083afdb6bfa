"""Measure: the done-when rollout scenarios of issue 23 under 64 keep-alive and 64 new-connection clients.

Each scenario serves release 1 with 4 workers, reloads to release 2 with a
canary of 1 worker (the real `upgraderd reload`, which waits for the verdict),
and counts every answer by the generation that gave it
(tests/support/rolloutscenario.py):

- errors:   release 2 answers 500 to 30% of requests (asgi:), checks error_ratio {max: 0.02, vs_previous: 2};
- crash:    release 2 exits 10 s after it starts (asgi:, os._exit), checks crashes: 0;
- slow:     release 2 takes 3x as long per request (asgi:, 40 ms -> 120 ms), checks latency_p99 {vs_previous: 1.5};
- good-http, good-asgi: release 2 is as good as release 1, with both traffic checks: promoted.

    .venv/bin/python -m bench.rollout_scenarios [--window 15] [--keepalive 64] [--fresh 64] [--only errors,...]

Per scenario it prints one JSON line: the reload's exit and verdict line, the
canary's share of the answers during its window (at most 1/4 is the
done-when), answers not 200 from release 1, failed requests before and after
the verdict, keep-alive reconnects, and how long the verdict took.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from tests.support.rolloutscenario import canary, port_and_metrics, release, run

ASGI = "asgi:release_app:app"


def scenarios(window: float) -> dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """Return name -> (release 1's env and app, release 2's, the rollout section)."""
    w = f"{window:g}s"
    traffic = {"error_ratio": {"max": 0.02, "vs_previous": 2.0}, "latency_p99": {"vs_previous": 1.5}}
    return {
        "errors": ({"app": ASGI}, {"app": ASGI, "RELEASE_FAULT": "errors:0.3"},
                   canary(w, error_ratio=traffic["error_ratio"])),
        "crash": ({"app": ASGI}, {"app": ASGI, "RELEASE_FAULT": "crash:10"}, canary(f"{max(window, 20):g}s")),
        "slow": ({"app": ASGI, "RELEASE_DELAY_MS": "40"}, {"app": ASGI, "RELEASE_DELAY_MS": "40",
                                                            "RELEASE_FAULT": "slow:3"},
                 canary(w, latency_p99=traffic["latency_p99"])),
        "good-http": ({"app": "http"}, {"app": "http", "RELEASE": "2"}, canary(w, **traffic)),
        "good-asgi": ({"app": ASGI, "RELEASE_DELAY_MS": "40"}, {"app": ASGI, "RELEASE_DELAY_MS": "40", "RELEASE": "2"},
                      canary(w, **traffic)),
    }


def one(name: str, r1: dict[str, Any], r2: dict[str, Any], rollout: dict[str, Any], keepalive: int,
        fresh: int) -> dict[str, Any]:
    port, metrics = port_and_metrics()
    v1 = release(port, metrics, **r1)
    v2 = {**release(port, metrics, **r2), **rollout}
    with tempfile.TemporaryDirectory() as tmp:
        o = run(Path(tmp), v1, v2, keepalive, fresh, warm=1000, after=1000, timeout=180)
    to_canary, total = o.canary_share()
    before = [f for f in o.tally.failures if f[0] <= o.verdict_at]
    return {"scenario": name, "exit": o.code, "verdict": (o.stderr.splitlines()[1:2] or [o.stdout.strip()])[0],
            "canary_share": round(to_canary / max(1, total), 3), "canary_answers": to_canary, "window_answers": total,
            "answers": len(o.tally.answers), "release1_not_200": o.tally.bad_answers(1),
            "release2_not_200": o.tally.bad_answers(2), "failed_before_verdict": len(before),
            "failed_after_verdict": len(o.failures_after_verdict()), "keepalive_reconnects": o.tally.reconnects,
            "announced_closes": o.tally.announced, "verdict_after_s": round(o.verdict_at - o.serving_at, 1),
            "serving_alone": o.settled,
            "judged": re.findall(r"rollout check (?:error_ratio|latency_p99) .*", o.log)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=float, default=15.0)
    p.add_argument("--keepalive", type=int, default=64)
    p.add_argument("--fresh", type=int, default=64)
    p.add_argument("--only", default="")
    a = p.parse_args()
    for name, (r1, r2, rollout) in scenarios(a.window).items():
        if a.only and name not in a.only.split(","):
            continue
        print(json.dumps(one(name, r1, r2, rollout, a.keepalive, a.fresh)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
