"""The traffic checks of a canary: `rollout.checks.error_ratio` and `rollout.checks.latency_p99`.

    checks:
      error_ratio: {max: 0.02, vs_previous: 2.0, min_requests: 100}
      latency_p99: {vs_previous: 1.5, min_requests: 100, floor: 10ms}

Both judge the new generation by the request counts its workers write into
their metric files (`upgraderd_http_requests_total` and
`upgraderd_http_request_duration_seconds`, apps/asgi/reqmetrics.py), so they
need workers that write them (`workers.app`: `http`, `asgi:` or `wsgi:`) and a
master that reads them (`metrics.listen`); config/checks.py refuses them
otherwise. The judging lives in core/trafficchecks.py; this module only
declares and validates the keys.

`min_requests` is the floor for tiny counts: a share or a quantile of fewer
requests is not judged (docs/rollouts.md says what happens then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from upgraderd.config.validators import Invalid, duration, integer, opt, _show


def share(v: Any) -> float:
    """number 0..1 (a share of the requests: 0.02 is 2%)"""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise Invalid(f"{_show(v)} is not a share between 0 and 1 (0.02 is 2%)")
    return float(v)


def factor(v: Any) -> float:
    """number >= 1 (a multiple of the previous generation's figure)"""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1:
        raise Invalid(f"{_show(v)} is not a factor of at least 1 (1.5 allows 50% more than the previous "
                      "generation)")
    return float(v)


def optional_factor(v: Any) -> float | None:
    """number >= 1, or null (off) (a multiple of the previous generation's figure)"""
    return None if v is None else factor(v)


def unmet(app: str | None, metrics_listen: str | None) -> str | None:
    """Say why workers of `app` under a master with `metrics.listen` cannot be judged by their traffic."""
    counted = app == "http" or (app or "").partition(":")[0] in ("asgi", "wsgi")
    if not counted:
        what = f"workers.app is {app}" if app else "the workers are a command"
        return f"{what}: only the built-in http app and asgi:/wsgi: apps count their requests for upgraderd " \
               "(use the http or command check for other workers)"
    if metrics_listen is None:
        return "metrics.listen is null: the master reads the workers' request counts only with metrics on"
    return None


@dataclass(frozen=True, kw_only=True)
class ErrorRatioSpec:
    """The new generation's share of 5xx answers during the rollout."""

    NOT_YET: ClassVar[dict[str, str]] = {}
    max: float = opt(1.0, share, "Fail when the new generation's 5xx share is above this (1: off).")
    vs_previous: float | None = opt(None, optional_factor, "Fail when its 5xx share is above this many times the "
                                    "serving generation's over the same time.")
    min_requests: int = opt(100, integer(1, 10_000_000), "Judge a generation's share only once it answered "
                            "this many requests in the rollout (a smaller count is noise).")


@dataclass(frozen=True, kw_only=True)
class LatencySpec:
    """The new generation's 99th percentile of request durations during the rollout."""

    NOT_YET: ClassVar[dict[str, str]] = {}
    vs_previous: float = opt(1.5, factor, "Fail when its p99 is above this many times the serving "
                             "generation's over the same time (judged at the window's end).")
    min_requests: int = opt(100, integer(1, 10_000_000), "Judge only when both generations answered this "
                            "many requests in the window.")
    floor: float = opt(0.01, duration, "A p99 below this counts as this: on a busy host, being scheduled "
                       "late alone costs a few ms, which would make a fast release's p99 look many times worse.")
