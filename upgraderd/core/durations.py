"""A duration histogram that keeps bucket counts, not the samples.

The master records how long every reload and every drain took for as long as
it lives. Keeping each sample would grow without bound over months of reloads
and make every scrape walk all of them; a fixed set of bucket counts costs the
same after a million reloads as after one. The buckets are chosen once, here,
because changing them would break the series an operator's dashboards query.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field

# HUP -> ACTIVE: a Python worker is ready in a fraction of a second; the
# default ready.timeout is 30 s.
RELOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# DRAINING -> RETIRED: as short as the last idle connection, as long as
# drain.timeout (30 s by default, often minutes for long-lived streams).
DRAIN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


@dataclass(frozen=True)
class HistogramData:
    """A point-in-time copy of a histogram: cumulative buckets (ending with +Inf) and the sum."""

    buckets: tuple[tuple[float, int], ...]
    total: float

    @property
    def count(self) -> int:
        """Return the number of observations."""
        return self.buckets[-1][1] if self.buckets else 0


@dataclass
class Durations:
    """Counts of observed durations per bucket; only ever grows."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.bounds = tuple(self.bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"bucket bounds must be strictly increasing: {self.bounds}")
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(f"{len(self.counts)} counts for {len(self.bounds)} bounds")

    def copy(self) -> Durations:
        """Return a copy that later observations leave alone."""
        return dataclasses.replace(self, counts=list(self.counts))

    def observe(self, seconds: float) -> None:
        """Count one duration (negative clock noise counts as 0)."""
        seconds = max(0.0, seconds)
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        """Return the number of observations."""
        return sum(self.counts)

    def data(self) -> HistogramData:
        """Return cumulative buckets (upper bound, count <= bound), +Inf last."""
        out: list[tuple[float, int]] = []
        acc = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            acc += n
            out.append((bound, acc))
        return HistogramData(tuple(out), self.total)
