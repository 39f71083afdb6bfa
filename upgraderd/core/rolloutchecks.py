"""Rollout checks: what fails a canary while it is watched (`rollout.checks`).

Each check is one class behind the `Check` protocol, as readiness modes are
(core/readiness.py): `begin` when the canary serves, `poll` on every pass of
the loop until the verdict, `stop` at the verdict. A check that fails returns
its figures as one line ("2 worker exits (allowed: 0); last: pid 812 exited
with code 1"), which reaches the log, the status file and `upgraderd reload`.

- `crashes`: worker exits of the new generation since it became ACTIVE, over
  the allowed number (the generation counts them in `Generation.crashed`).
- `http`: every `every` seconds each READY worker's URL (placeholders expanded
  at its launch, `Generation.check_urls`) must answer 2xx within `timeout`;
  the probes are the non-blocking ones of readiness (system/probe.py, through
  the `ProbeAPI` seam), a separate instance keyed by worker pid.
- `error_ratio`, `latency_p99`: the new generation's answers against the
  serving generation's, from the workers' request counts (core/trafficchecks.py).
- `command`: started once through the `ProcessAPI` seam when the canary
  serves, it must exit 0 before the window ends. Its exit is claimed from the
  reaped children before the fleet sees them (`claim`), because the master
  reaps every child with waitpid(-1).

A check `passed` once it has nothing left to prove before promotion (the
command exited 0); the others are passed at every moment they have not failed.

Nothing here makes a syscall: time is the `now` argument and the OS is the seams.
"""

from __future__ import annotations

import logging
import signal
from typing import Iterable, Mapping, Protocol

from upgraderd.config import placeholders
from upgraderd.config.rolloutspec import ChecksSpec
from upgraderd.contract import env as contract
from upgraderd.core import trafficchecks as traffic
from upgraderd.core.generation import Generation, WorkerState
from upgraderd.core.requestcounts import RequestReader
from upgraderd.core.seams import Exit, ProbeAPI, ProcessAPI
from upgraderd.errors import SpawnError

log = logging.getLogger("upgraderd")


class Check(Protocol):
    """One rollout check."""

    name: str

    def begin(self, gen: Generation, now: float) -> None:
        """Start watching `gen`, whose canary serves from `now`."""

    def poll(self, gen: Generation, now: float) -> str | None:
        """Advance; return why the check failed (its figures), or None."""

    def passed(self) -> bool:
        """Return True if nothing is left to prove before promotion."""

    def deadline(self) -> float | None:
        """Return when `poll` next has something to do by time alone."""

    def stop(self) -> None:
        """Stop whatever the check started (probes, the command)."""


class Crashes:
    """Fail when the new generation's workers exit more than `allowed` times."""

    name = "crashes"

    def __init__(self, allowed: int) -> None:
        self.allowed, self.baseline = allowed, 0

    def begin(self, gen: Generation, now: float) -> None:
        """Count from the exits the generation has had so far (none, while it started)."""
        self.baseline = gen.crashed

    def poll(self, gen: Generation, now: float) -> str | None:
        """Return the exits over the allowed number, with the last one."""
        n = gen.crashed - self.baseline
        if n <= self.allowed:
            return None
        return f"{n} worker exit(s) of generation {gen.number} (allowed: {self.allowed}); last: {gen.last_crash}"

    def passed(self) -> bool:
        """Return True: it has not failed so far."""
        return True

    def deadline(self) -> float | None:
        """Return None: only exits move it."""
        return None

    def stop(self) -> None:
        """Nothing to stop."""


class Http:
    """Fail when a READY worker's URL does not answer 2xx within `timeout`."""

    name = "http"

    def __init__(self, probes: ProbeAPI, every: float, timeout: float) -> None:
        self.probes, self.every, self.timeout = probes, every, timeout
        self.due: dict[int, float] = {}        # pid -> when its next probe starts
        self.until: dict[int, float] = {}      # pid -> when its probe under way fails
        self.answered = 0

    def begin(self, gen: Generation, now: float) -> None:
        """Probe every READY worker at once."""
        self.due = {}

    def poll(self, gen: Generation, now: float) -> str | None:
        """Start the probes that are due; fail on one not answered 2xx in time."""
        for pid in self.probes.poll(now):
            self.until.pop(pid, None)
            self.answered += 1
        for pid, until in list(self.until.items()):
            if now >= until:
                url, why = self.probes.remove(pid) or ("", "no answer")
                self.until.pop(pid)
                slot = next((w.slot for p, w in gen.pids().items() if p == pid), "?")
                return f"GET {url} (slot {slot}) got no 2xx within {self.timeout:g}s: {why} " \
                       f"({self.answered} probe(s) answered 2xx before)"
        for pid, w in gen.pids().items():
            target = gen.check_urls.get(w.slot)
            if w.state is not WorkerState.READY or target is None or pid in self.until:
                continue
            if now >= self.due.setdefault(pid, now):
                self.probes.add(pid, target, now)
                self.until[pid], self.due[pid] = now + self.timeout, now + self.every
        return None

    def passed(self) -> bool:
        """Return True: it has not failed so far."""
        return True

    def deadline(self) -> float | None:
        """Return the next probe start or failure deadline (the probes' own come through the seam)."""
        times = [*self.until.values(), *(d for p, d in self.due.items() if p not in self.until)]
        return min(times, default=None)

    def stop(self) -> None:
        """Stop every probe under way."""
        for pid in list(self.until):
            self.probes.remove(pid)
        self.until.clear()


class Command:
    """Fail unless `argv` exits 0 before the window ends."""

    name = "command"

    def __init__(self, procs: ProcessAPI, argv: tuple[str, ...], environ: Mapping[str, str],
                 window: float) -> None:
        self.procs, self.argv, self.environ, self.window = procs, argv, environ, window
        self.pid: int | None = None
        self.shown, self.ends = " ".join(argv), 0.0
        self.result: str | None = None        # "" passed, else why it failed

    def begin(self, gen: Generation, now: float) -> None:
        """Start the command with {generation} expanded."""
        argv = [placeholders.expand(a, {"generation": str(gen.number)}) for a in self.argv]
        self.shown, self.ends = " ".join(argv), now + self.window
        try:
            self.pid = self.procs.spawn(argv, {**self.environ, contract.GENERATION: str(gen.number)}, ())
        except SpawnError as e:
            self.result = str(e)
            return
        log.info("rollout check command started (pid %d): %s", self.pid, " ".join(argv))

    def claim(self, exits: Iterable[Exit]) -> list[Exit]:
        """Take the command's exit out of `exits`; return the others."""
        rest = []
        for ex in exits:
            if self.pid is not None and ex.pid == self.pid:
                self.pid = None
                self.result = "" if ex.code == 0 else f"{self.shown} {ex.describe()}"
            else:
                rest.append(ex)
        return rest

    def poll(self, gen: Generation, now: float) -> str | None:
        """Return why the command failed, or that it is still running at the window's end."""
        if self.result:
            return self.result
        if self.result is None and self.pid is not None and now >= self.ends:
            return f"{self.shown} still running after the {self.window:g}s window"
        return None

    def passed(self) -> bool:
        """Return True once the command exited 0."""
        return self.result == ""

    def deadline(self) -> float | None:
        """Return the window's end while the command runs."""
        return self.ends if self.pid is not None else None

    def stop(self) -> None:
        """Kill the command if it still runs (its exit is still claimed when reaped)."""
        if self.pid is not None:
            self.procs.kill(self.pid, signal.SIGKILL)


def for_spec(spec: ChecksSpec, window: float, probes: ProbeAPI | None, procs: ProcessAPI,
             environ: Mapping[str, str], read: RequestReader | None = None,
             previous: Generation | None = None) -> list[Check]:
    """Return the checks `spec` (the `rollout.checks` section) selects; `read` and `previous` (the
    serving generation) are what the traffic checks compare."""
    out: list[Check] = [Crashes(spec.crashes)]
    no_counts = "this master reads no worker request counts (metrics.listen is null)"
    if spec.error_ratio is not None:
        out.append(traffic.ErrorRatio(spec.error_ratio, read, previous, window) if read is not None
                   else Unavailable("error_ratio", no_counts))
    if spec.latency_p99 is not None:
        out.append(traffic.LatencyP99(spec.latency_p99, read, previous, window) if read is not None
                   else Unavailable("latency_p99", no_counts))
    if spec.http is not None:
        out.append(Http(probes, spec.http.every, spec.http.timeout) if probes is not None
                   else Unavailable("http", "this master has no probes for http checks"))
    if spec.command is not None:
        out.append(Command(procs, spec.command, environ, window))
    return out


class Unavailable(Crashes):
    """A configured check this master cannot run: it fails at once rather than pass unchecked."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(0)
        self.name, self.why = name, why

    def poll(self, gen: Generation, now: float) -> str | None:
        """Return why the check cannot run."""
        return self.why
