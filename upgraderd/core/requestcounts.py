"""Request counts per generation, from the workers' metric files: what the traffic checks judge.

A worker that serves HTTP (the built-in `http` app, `asgi:` and `wsgi:`)
counts its answers in its own metric files: `upgraderd_http_requests_total`
by status class and the `upgraderd_http_request_duration_seconds` histogram
(apps/asgi/reqmetrics.py). The master reads one worker's files through the
`RequestReader` seam (metrics/requestfiles.py) and gets a `RequestCounts`:
totals since the worker started, summed over its listeners.

`GenerationCounts` turns those per-worker totals into one generation's counts
since a moment (the canary's start): deltas per pid, added up.

Invariants:
- A pid that was in the generation when counting began is counted from its
  first reading (its baseline); a pid that joined later (a respawn, a
  promoted slot) from 0, since all it answered came after the start.
- A pid whose files are gone (the master folded them when it reaped the
  worker) keeps its last delta: a crash does not erase the answers it gave.
- Counts never go down: a reading below the last one (a worker that
  rewrote its file) is ignored for that pid.

Hazard: the workers write their files at their own tick (0.5 s for asgi:, 20 ms
for the built-in apps), so a reading lags what they answered by that much.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

Buckets = tuple[tuple[float, float], ...]   # (upper bound, answers in that bucket alone), ascending, +inf last


@dataclass(frozen=True)
class RequestCounts:
    """One worker's (or one generation's) answered requests."""

    requests: float = 0.0
    errors: float = 0.0          # answered 5xx
    buckets: Buckets = ()

    def minus(self, before: RequestCounts) -> RequestCounts:
        """Return what was answered since `before` (a reading of the same worker)."""
        old = dict(before.buckets)
        return RequestCounts(self.requests - before.requests, self.errors - before.errors,
                             tuple((b, n - old.get(b, 0.0)) for b, n in self.buckets))

    def plus(self, other: RequestCounts) -> RequestCounts:
        """Return both counts together."""
        merged = dict(self.buckets)
        for b, n in other.buckets:
            merged[b] = merged.get(b, 0.0) + n
        return RequestCounts(self.requests + other.requests, self.errors + other.errors,
                             tuple(sorted(merged.items())))

    def share(self) -> float:
        """Return the 5xx share (0 with no requests)."""
        return self.errors / self.requests if self.requests > 0 else 0.0

    def quantile(self, q: float) -> float | None:
        """Return the `q` quantile of the durations, interpolated linearly inside its bucket as
        Prometheus's histogram_quantile does (None without answers; the last finite bound if it
        falls in the +inf bucket)."""
        total = sum(n for _, n in self.buckets)
        if total <= 0:
            return None
        rank, seen, lower = q * total, 0.0, 0.0
        for bound, n in self.buckets:
            if n > 0 and seen + n >= rank:
                if bound == float("inf"):
                    return lower
                return lower + (bound - lower) * (rank - seen) / n
            seen += n
            if bound != float("inf"):
                lower = bound
        return lower


# Read the request counts of worker `pids` from their metric files; a pid without readable files is left out.
RequestReader = Callable[[Sequence[int]], Mapping[int, RequestCounts]]


@dataclass
class GenerationCounts:
    """One generation's answers since counting began, from its workers' readings."""

    started_with: frozenset[int]                       # its pids when counting began
    baseline: dict[int, RequestCounts] = field(default_factory=dict)
    last: dict[int, RequestCounts] = field(default_factory=dict)

    def update(self, pids: Iterable[int], readings: Mapping[int, RequestCounts]) -> None:
        """Take the readings of the generation's live `pids` (and any pid it had before)."""
        for pid in {*pids, *self.baseline}:
            now = readings.get(pid)
            if now is None:
                continue                                   # gone or unreadable: keep its last delta
            if pid not in self.baseline:
                self.baseline[pid] = now if pid in self.started_with else RequestCounts()
            last = self.last.get(pid)
            if last is None or now.requests >= last.requests:
                self.last[pid] = now

    def total(self) -> RequestCounts:
        """Return the generation's answers since counting began."""
        out = RequestCounts()
        for pid, now in self.last.items():
            out = out.plus(now.minus(self.baseline[pid]))
        return out
