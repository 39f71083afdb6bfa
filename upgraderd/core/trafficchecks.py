"""The traffic checks of a canary: its 5xx share and its p99 against the serving generation's.

Two `Check`s (core/rolloutchecks.py's protocol), built from
`rollout.checks.error_ratio` and `rollout.checks.latency_p99`
(config/trafficspec.py). Both read the workers' request counts through the
`RequestReader` seam every `SAMPLE_EVERY` seconds, for the new generation and
for the one serving beside it, and judge each generation's answers since the
canary started serving (core/requestcounts.py `GenerationCounts`): both over
the same stretch of time, so a quiet night or a busy minute shifts both alike.

- `error_ratio` is judged at every sample once the new generation answered
  `min_requests`: it fails when the new generation's 5xx share is above
  `max`, or above `vs_previous` times the serving generation's share. The
  serving generation's share counts only once it too answered `min_requests`,
  and never as less than 1 / `min_requests` (a share measured over N requests
  is not known better than one in N: 0 errors in 100 does not make 1 in 1,000
  twice as bad).
- `latency_p99` is judged once, at the window's end, from the histograms of
  the whole window: a p99 needs many answers, and a cold start's first slow
  requests would fail an early judgement. It fails when the new p99 is above
  `vs_previous` times the serving one, a p99 under `floor` (10 ms by default)
  counting as `floor`: measured on a busy 2-core host, the built-in http app's
  p99 was 1.0 ms in the serving generation and 3.8 ms in an identical canary
  (bench/rollout_scenarios.py), only from being scheduled late, which a 1 ms
  floor (the histogram's first bound) judged as a release 3.8 times slower.
- With fewer than `min_requests` answers by the window's end the check does
  not judge and passes, and the log says so: a canary that got no traffic
  proved nothing either way, and the other checks still apply.

The figures of a failure name both generations' shares or p99s and counts.
Nothing here makes a syscall: the readings come through the seam.
"""

from __future__ import annotations

import logging

from upgraderd.config.trafficspec import ErrorRatioSpec, LatencySpec
from upgraderd.core.generation import Generation
from upgraderd.core.requestcounts import GenerationCounts, RequestCounts, RequestReader

log = logging.getLogger("upgraderd")

SAMPLE_EVERY = 0.5          # seconds between two readings of the workers' files


class _Traffic:
    """What both traffic checks share: the readings of both generations since the canary serves."""

    name = ""

    def __init__(self, read: RequestReader, previous: Generation | None, window: float) -> None:
        self.read, self.previous, self.window = read, previous, window
        self.new = GenerationCounts(frozenset())
        self.old = GenerationCounts(frozenset())
        self.due = self.ends = 0.0
        self.done = False                 # judged for good (or stopped)

    def begin(self, gen: Generation, now: float) -> None:
        """Count both generations' answers from now."""
        self.new = GenerationCounts(frozenset(gen.pids()))
        self.old = GenerationCounts(frozenset(self.previous.pids()) if self.previous is not None else frozenset())
        self.ends = now + self.window
        self._sample(gen, now)

    def _sample(self, gen: Generation, now: float) -> None:
        new_pids = list(gen.pids())
        old_pids = list(self.previous.pids()) if self.previous is not None else []
        readings = self.read([*new_pids, *old_pids, *self.new.baseline, *self.old.baseline])
        self.new.update(new_pids, readings)
        self.old.update(old_pids, readings)
        self.due = now + SAMPLE_EVERY

    def _sampled(self, gen: Generation, now: float) -> bool:
        """Read the files if a sample is due; return True if it was."""
        if self.done or now < self.due:
            return False
        self._sample(gen, now)
        return True

    def passed(self) -> bool:
        """Return True: a traffic check only ever fails."""
        return True

    def deadline(self) -> float | None:
        """Return when the next sample is due."""
        return None if self.done else self.due

    def stop(self) -> None:
        """Stop sampling."""
        self.done = True

    def _unjudged(self, gen: Generation, why: str) -> None:
        log.warning("rollout check %s of generation %d not judged: %s", self.name, gen.number, why)


class ErrorRatio(_Traffic):
    """Fail when the new generation's 5xx share is above `max` or `vs_previous` x the serving one's."""

    name = "error_ratio"

    def __init__(self, spec: ErrorRatioSpec, read: RequestReader, previous: Generation | None,
                 window: float) -> None:
        super().__init__(read, previous, window)
        self.spec = spec
        self.judged = False

    def poll(self, gen: Generation, now: float) -> str | None:
        """Judge the counts at each sample."""
        if not self._sampled(gen, now):
            return None
        new, old = self.new.total(), self.old.total()
        if new.requests >= self.spec.min_requests:
            self.judged = True
            why = self._verdict(new, old)
            if why:
                return why
        if now >= self.ends and not self.judged:
            self.judged = True   # said once
            self._unjudged(gen, f"{_count(new.requests)} request(s) in the {self.window:g}s window "
                                f"(min_requests: {self.spec.min_requests})")
        return None

    def _verdict(self, new: RequestCounts, old: RequestCounts) -> str | None:
        spec, share = self.spec, new.share()
        prev = f"previous {_pct(old.share())} of {_count(old.requests)}"
        if share > spec.max:
            return f"5xx {_pct(share)} of {_count(new.requests)} requests (max {100 * spec.max:g}%, {prev})"
        if spec.vs_previous is not None and old.requests >= spec.min_requests:
            limit = spec.vs_previous * max(old.share(), 1 / spec.min_requests)
            if share > limit:
                return f"5xx {_pct(share)} of {_count(new.requests)} requests, above {spec.vs_previous:g}x " \
                       f"the {prev} (allowed {_pct(limit)}, max {100 * spec.max:g}%)"
        return None


class LatencyP99(_Traffic):
    """Fail when the new generation's p99 over the window is above `vs_previous` x the serving one's."""

    name = "latency_p99"

    def __init__(self, spec: LatencySpec, read: RequestReader, previous: Generation | None,
                 window: float) -> None:
        super().__init__(read, previous, window)
        self.spec = spec

    def poll(self, gen: Generation, now: float) -> str | None:
        """Sample through the window; judge once at its end."""
        if now < self.ends:
            self._sampled(gen, now)
            return None
        if self.done:
            return None
        self._sample(gen, now)
        self.done = True
        new, old = self.new.total(), self.old.total()
        few = min(new.requests, old.requests)
        if few < self.spec.min_requests:
            self._unjudged(gen, f"generation {gen.number} answered {_count(new.requests)} and the previous "
                                f"{_count(old.requests)} request(s) in the window (min_requests: "
                                f"{self.spec.min_requests})")
            return None
        p_new, p_old = new.quantile(0.99) or 0.0, old.quantile(0.99) or 0.0
        limit = self.spec.vs_previous * max(p_old, self.spec.floor)
        if max(p_new, self.spec.floor) > limit:
            return f"p99 {_ms(p_new)} over {_count(new.requests)} requests, above {self.spec.vs_previous:g}x " \
                   f"the previous {_ms(p_old)} over {_count(old.requests)} (allowed {_ms(limit)})"
        log.info("rollout check latency_p99 of generation %d passed: p99 %s over %s requests, previous %s over "
                 "%s", gen.number, _ms(p_new), _count(new.requests), _ms(p_old), _count(old.requests))
        return None

    def deadline(self) -> float | None:
        """Return the next sample, or the window's end if that comes first."""
        return None if self.done else min(self.due, self.ends)

    def passed(self) -> bool:
        """Return True once judged at the window's end."""
        return self.done


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _count(n: float) -> str:
    return f"{int(n):,}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms"
