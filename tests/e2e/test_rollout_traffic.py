"""Canary rollouts judged by traffic, end to end: bad releases rolled back, good ones promoted, under load.

Each test serves release 1 (4 workers), reloads with the real `upgraderd
reload` to release 2 with a canary of 1 worker, under 8 keep-alive and 8
new-connection HTTP clients whose answers name the generation that gave them
(tests/support/rolloutscenario.py). The releases are tests/fixtures/release_app.py
(asgi:) with a fault switched on, and the built-in http app. The full load
(64 + 64 clients, longer windows) is bench/rollout_scenarios.py.

For every bad release: `upgraderd reload` exits 1 naming the check and its
figures; the canary got at most 1/4 of the answers during its window; release 1
answered every request it got with 200, and no request failed after the
verdict. A good release is promoted after its window with 0 failed requests
and 0 reconnects.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.rolloutscenario import Outcome, canary, port_and_metrics, release, run

pytestmark = pytest.mark.e2e

ASGI = "asgi:release_app:app"


def rolled_back(o: Outcome, check: str, figures: str) -> None:
    lines = o.stderr.splitlines()
    assert o.code == 1, (o.stdout, o.stderr)
    assert lines[0] == "upgraderd: reload failed: generation 2 was rolled back (the old one keeps serving)"
    assert re.fullmatch(rf"generation 2 rolled back: check {check} failed: {figures}", lines[1]), lines
    assert o.settled == 1
    to_canary, total = o.canary_share()
    assert 0 < to_canary and to_canary * 4 <= total, (to_canary, total)
    assert o.tally.bad_answers(1) == 0
    assert o.failures_after_verdict() == []
    print(f"\n{check}: canary got {to_canary} of {total} answers in its window ({to_canary / total:.3f}); "
          f"{len(o.tally.failures)} failed before the verdict, 0 after; {lines[1]}")


def test_a_release_answering_500_to_30_percent_is_rolled_back_by_error_ratio(tmp_path: Path) -> None:
    port, metrics = port_and_metrics()
    o = run(tmp_path, release(port, metrics, ASGI),
            {**release(port, metrics, ASGI, RELEASE_FAULT="errors:0.3"),
             **canary("30s", error_ratio={"max": 0.02, "vs_previous": 2.0, "min_requests": 50})},
            keepalive=8, fresh=8)
    rolled_back(o, "error_ratio", r"5xx (2[5-9]|3[0-5])\.\d% of [\d,]+ requests \(max 2%, previous 0\.0% of [\d,]+\)")
    assert o.tally.failures == []                    # 500s are answers: the canary drained, nothing was cut
    assert o.verdict_at - o.serving_at < 25          # judged as soon as it had 50 answers, not at the window's end


def test_a_release_whose_p99_triples_is_rolled_back_by_latency_p99(tmp_path: Path) -> None:
    port, metrics = port_and_metrics()
    o = run(tmp_path, release(port, metrics, ASGI, RELEASE_DELAY_MS="40"),
            {**release(port, metrics, ASGI, RELEASE_DELAY_MS="40", RELEASE_FAULT="slow:3"),
             **canary("3s", latency_p99={"vs_previous": 1.5, "min_requests": 20})},
            keepalive=8, fresh=8)
    rolled_back(o, "latency_p99", r"p99 [\d.]+ms over [\d,]+ requests, above 1\.5x the previous [\d.]+ms over "
                r"[\d,]+ \(allowed [\d.]+ms\)")
    assert o.tally.failures == []


def test_a_release_that_crashes_in_its_window_is_rolled_back(tmp_path: Path) -> None:
    port, metrics = port_and_metrics()
    o = run(tmp_path, release(port, metrics, ASGI),
            {**release(port, metrics, ASGI, RELEASE_FAULT="crash:1.5"),
             **canary("30s", error_ratio={"max": 0.02, "min_requests": 50})},
            keepalive=8, fresh=8)
    rolled_back(o, "crashes", r"1 worker exit\(s\) of generation 2 \(allowed: 0\); last: slot 0 pid \d+ exit code 1")
    # Only requests on the crashed canary's connections failed (os._exit drops them), never release 1's.
    assert all(f[2] in (0, 2) for f in o.tally.failures), o.tally.failures


@pytest.mark.parametrize("app", ["http", ASGI])
def test_a_good_release_is_promoted_with_nothing_failed_and_no_reconnect(tmp_path: Path, app: str) -> None:
    port, metrics = port_and_metrics()
    delay = {"RELEASE_DELAY_MS": "40"} if app == ASGI else {}
    o = run(tmp_path, release(port, metrics, app, **delay),
            {**release(port, metrics, app, RELEASE="2", **delay),
             **canary("3s", error_ratio={"max": 0.02, "vs_previous": 2.0, "min_requests": 50},
                      latency_p99={"vs_previous": 2.0, "min_requests": 20})},
            keepalive=8, fresh=8)
    assert (o.code, o.stdout, o.stderr) == (0, "reload done: generation 2 ACTIVE\n", "")
    assert o.settled == 2
    assert o.tally.failures == [] and o.tally.bad_answers(1) == 0 and o.tally.bad_answers(2) == 0
    assert (o.tally.reconnects, o.tally.announced) == (0, 0)   # keep-alive connections handed over, never closed
    last = o.tally.answers[-100:]
    assert {a[1] for a in last} == {2}
    print(f"\n{app}: promoted, {len(o.tally.answers)} answers, canary share in its window "
          f"{o.canary_share()}, 0 failed, 0 reconnects")
