"""The rollouts: the owner of a canary under way, its checks, and its verdict.

With `rollout.strategy: canary` a reload that has a serving generation to
fall back on starts the new generation with `canary.workers` workers only, and
the fleet holds it (core/fleet.py `held`): ACTIVE once its workers are ready,
but its predecessor keeps serving and is not drained.

    reload ──▶ canary STARTING ──ready──▶ CANARY (window: the checks run)
                   │                         │ a check fails ──▶ ROLLED BACK: the canary drains,
                   │ a worker exits / timeout│                   the predecessor carries on
                   ▼                         ▼ the window ends, every check passed
                 FAILED (as any reload)   PROMOTING (the canary grows to workers.count; the checks
                                             │        still run, and every new worker must be ready
                                             │        within ready.timeout, else check `ready` fails)
                                             ▼ all ready
                                          PROMOTED: released; the predecessor drains as after any reload

With `rollout.strategy: batches` the held generation starts with
`batches.size` workers and core/batches.py grows it batch by batch over its
predecessor (`Rollout.batches`); the checks, the verdict and the rollback are
this module's, as for a canary.

Which connections reach the canary: it serves from the same sockets as its
predecessor, so
- `shared` mode: one accept queue for both generations; the canary's share of
  new connections is about canary.workers / (workers.count + canary.workers),
  as evenly as the kernel wakes the processes blocked on that queue;
- `reuseport` mode: canary worker i accepts on slot i's socket beside the
  predecessor's worker i; the steering program keeps sending each slot's
  share (1 / workers.count), and the two processes on a slot socket split it
  as the kernel wakes them, so the canary gets about half of its slots' share.
  Neither mode is exact; neither sends the canary more than
  canary.workers / workers.count of new connections.

Invariants:
- At most one rollout, the reload under way's (core/reloads.py waits for its
  verdict before it settles the reload or runs a queued one).
- The predecessor stays ACTIVE, is never signalled, and keeps its respawns
  until the canary is promoted; a rollback leaves it exactly as it was.
- The verdict is reported once (`RolloutSettled`), and the reload's outcome
  follows it: success when promoted, failed (naming the check) when rolled back.
- With `rollback: manual` a failing check holds the rollout instead of rolling
  it back, until the operator decides (core/rollouthold.py). A rolled-back
  canary's workers give their connections back to the predecessor where they
  can hand off (worker/giver.py: no newer generation, so the newest older one).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from upgraderd.config.schema import Config
from upgraderd.core import batches as batchesmod
from upgraderd.core import rolloutchecks as checksmod
from upgraderd.core import rollouthold as hold
from upgraderd.core import events as ev
from upgraderd.core.fleet import Fleet
from upgraderd.core.generation import Generation, WorkerState
from upgraderd.core.requestcounts import RequestReader
from upgraderd.core.seams import Exit, ProbeAPI, ProcessAPI

log = logging.getLogger("upgraderd")

OPERATOR = "operator"   # the `check` of a rollback the operator asked for (not a check's failure)


class Phase(enum.Enum):
    CANARY = "canary"
    PROMOTING = "promoting"
    BATCHES = "batches"          # strategy batches (core/batches.py)


@dataclass
class Rollout:
    """One canary under way."""

    gen: Generation
    previous: int
    checks: list[checksmod.Check]
    began_at: float
    window_ends: float
    phase: Phase = Phase.CANARY
    promote_by: float = 0.0
    asked: str = ""              # the operator's `promote` or `rollback`, taken at the next pass
    batches: batchesmod.Batches | None = None
    held: str = ""               # rollback: manual: the failed check it waits on (core/rollouthold.py)


@dataclass(frozen=True)
class RolloutSeams:
    """What the checks need of the OS."""

    procs: ProcessAPI
    probes: ProbeAPI | None          # a prober of its own for `http` checks (None: not available)
    environ: Mapping[str, str]
    # Bind the sockets of a config's slots (a promotion's new slots may need theirs).
    ensure_listeners: Callable[[Config], object]
    tell_systemd: Callable[[str], None]
    # The workers' request counts, for the traffic checks (None: no metrics, they cannot run).
    read_requests: RequestReader | None = None


@dataclass(frozen=True)
class Progress:
    """A rollout's progress, as the status file and `upgraderd status` show it."""

    generation: int
    previous: int
    phase: str
    began_at: float
    window_ends: float
    workers: int
    of: int
    checks: tuple[str, ...] = field(default=())
    batch: int = 0               # strategy batches: the batch under way, of `batches`
    batches: int = 0
    held: str = ""                   # rollback: manual: why it waits for the operator


class Rollouts:
    """The canary under way and its verdict."""

    def __init__(self, seams: RolloutSeams, fleet: Fleet, bus: ev.Bus) -> None:
        self.seams, self.fleet, self.bus = seams, fleet, bus
        self.current: Rollout | None = None
        self.commands: list[checksmod.Command] = []   # their exits are claimed even after a verdict

    def canary_size(self, cfg: Config) -> int | None:
        """Return how many workers a reload to `cfg` starts with (None: all, no rollout)."""
        if cfg.rollout.strategy == "all-at-once" or self.fleet.active is None or self.fleet.stopping:
            return None
        return batchesmod.first_size(cfg) if cfg.rollout.strategy == "batches" else cfg.rollout.canary.workers

    def judge(self, gen: Generation, now: float) -> str | None:
        """Advance the rollout of the held, ACTIVE `gen`; return None while it goes on, ""
        once it is promoted, or why it was rolled back."""
        r = self.current if self.current is not None and self.current.gen is gen else self._begin(gen, now)
        if r.asked == "rollback":
            return self._roll_back(r, OPERATOR, "aborted by `upgraderd rollback`" + (
                f" ({r.held})" if r.held else ""), now)
        if r.batches is not None:
            return self._judge_batches(r, r.batches, now)
        if r.asked == "promote" and r.phase is Phase.CANARY:
            r.held = ""
            self._end_window(r, now)
        if r.held:
            return None   # rollback: manual, a check failed: the operator decides
        for check in r.checks:
            why = check.poll(gen, now)
            if why and hold.holds(gen, check.name):
                r.held = hold.hold(gen, r.previous, r.checks, check.name, why, self.bus, self.seams.tell_systemd)
                return None
            if why:
                return self._roll_back(r, check.name, why, now)
        if r.phase is Phase.CANARY and now >= r.window_ends and all(c.passed() for c in r.checks):
            self._promote(r, now)
        if r.phase is Phase.PROMOTING:
            late = [w.slot for w in gen.workers.values() if w.state is not WorkerState.READY]
            if not late and len(gen.workers) >= gen.config.workers.count:
                return self._promoted(r, now)
            if now >= r.promote_by:
                return self._roll_back(r, "ready", f"slot(s) {', '.join(map(str, late))} not ready within "
                                       f"{gen.config.ready.timeout:g}s of the promotion", now)
        return None

    def ask(self, request: str) -> None:
        """Take the operator's request, "promote N" or "rollback N" (`upgraderd promote|rollback`)."""
        action, _, number = request.strip().partition(" ")
        r = self.current
        if action not in ("promote", "rollback") or not number.isdigit():
            log.warning("ignored a rollout request that is neither `promote N` nor `rollback N`: %r",
                        request[:64])
        elif r is None or r.gen.number != int(number):
            log.warning("upgraderd %s: ignored, no rollout of generation %s is under way", action, number)
        elif action == "promote" and r.phase is Phase.PROMOTING:
            log.info("upgraderd promote: generation %d is already being promoted", r.gen.number)
        else:
            log.info("upgraderd %s: generation %d (asked by the operator)", action, r.gen.number)
            r.asked = action

    def end(self, gen: Generation) -> None:
        """Forget the rollout of `gen`, which settled another way (its start failed, the master stops)."""
        if self.current is not None and self.current.gen is gen:
            self._stop(self.current)
        self.fleet.release(gen)

    def claim(self, exits: Iterable[Exit]) -> list[Exit]:
        """Take the check commands' exits out of `exits`; return the rest (workers', templates')."""
        rest = list(exits)
        for cmd in self.commands:
            rest = cmd.claim(rest)
        self.commands = [c for c in self.commands if c.pid is not None]
        return rest

    def deadlines(self) -> list[float | None]:
        """Return when the rollout next needs the loop."""
        r = self.current
        if r is None or r.held:
            return []
        own = r.batches.deadline() if r.batches else r.window_ends if r.phase is Phase.CANARY else r.promote_by
        probes = self.seams.probes.next_deadline() if self.seams.probes is not None else None
        return [own, probes, *(c.deadline() for c in r.checks)]

    def progress(self) -> Progress | None:
        """Return the rollout under way, for the snapshot."""
        r = self.current
        if r is None:
            return None
        live = sum(1 for w in r.gen.workers.values() if w.state is WorkerState.READY)
        return Progress(r.gen.number, r.previous, r.phase.value, r.began_at, r.window_ends, live,
                        r.gen.config.workers.count, tuple(c.name for c in r.checks),
                        *((r.batches.number, r.batches.total) if r.batches else (0, 0)), held=r.held)

    # -- the steps --

    def _begin(self, gen: Generation, now: float) -> Rollout:
        spec = gen.config.rollout
        previous = self.fleet.active
        window = spec.batches.pause if spec.strategy == "batches" else spec.canary.window
        checks = checksmod.for_spec(spec.checks, window, self.seams.probes, self.seams.procs, self.seams.environ,
                                    self.seams.read_requests, previous)
        r = Rollout(gen, previous.number if previous else 0, checks, now, now + window)
        self.current = r
        for check in checks:
            check.begin(gen, now)
            if isinstance(check, checksmod.Command):
                self.commands.append(check)
        if spec.strategy == "batches":
            r.phase, r.batches = Phase.BATCHES, batchesmod.Batches.first(gen, now, self.seams.ensure_listeners,
                                                                         self.seams.tell_systemd)
            return r
        log.info("rollout: generation %d canary serving with %d of %d workers beside generation %d; "
                 "checks %s for %gs", gen.number, len(gen.workers), gen.config.workers.count, r.previous,
                 ", ".join(c.name for c in checks), spec.canary.window)
        self.seams.tell_systemd(f"STATUS=generation {gen.number} canary: {len(gen.workers)} of "
                                f"{gen.config.workers.count} workers, verdict in {spec.canary.window:g}s")
        return r

    def _judge_batches(self, r: Rollout, b: batchesmod.Batches, now: float) -> str | None:
        """Advance a rollout in batches (core/batches.py) and act on its verdict."""
        if r.asked == "promote":
            self._end_window(r, now)
            b.end_pauses(now)
            r.asked = ""
        failed = next(((c.name, why) for c in r.checks if (why := c.poll(r.gen, now))), None)
        verdict = b.step(r.gen, self.fleet.active, failed, all(c.passed() for c in r.checks), now)
        if verdict == batchesmod.PROMOTE:
            return self._promoted(r, now)
        return None if not isinstance(verdict, tuple) else self._roll_back(r, *verdict, now)

    def _end_window(self, r: Rollout, now: float) -> None:
        """End the window now (`upgraderd promote`): checks with something left to prove stop."""
        for check in [c for c in r.checks if not c.passed()]:
            check.stop()
            r.checks.remove(check)
            log.warning("upgraderd promote: generation %d promoted before check %s finished", r.gen.number,
                        check.name)
        r.window_ends = now

    def _promote(self, r: Rollout, now: float) -> None:
        gen = r.gen
        self.seams.ensure_listeners(gen.config)
        r.phase, r.promote_by = Phase.PROMOTING, now + gen.config.ready.timeout
        while len(gen.workers) < gen.config.workers.count:
            gen.add_slot(now)
        log.info("rollout: generation %d passed its %gs window; promoting it to %d workers", gen.number,
                 gen.config.rollout.canary.window, gen.config.workers.count)

    def _promoted(self, r: Rollout, now: float) -> str:
        self._stop(r)
        self.fleet.release(r.gen)
        self.fleet.drain_superseded(now)
        self.bus.emit(ev.RolloutSettled("promoted", r.gen.number, took=now - r.began_at))
        log.info("rollout: generation %d promoted after %.3fs; generation %d drains", r.gen.number,
                 now - r.began_at, r.previous)
        return ""

    def _roll_back(self, r: Rollout, check: str, why: str, now: float) -> str:
        self._stop(r)
        self.fleet.release(r.gen)
        r.gen.drain(now)
        if r.batches is not None:
            log.info("rollout: generation %d gets back slot(s) %s", r.previous,
                     ", ".join(map(str, r.batches.regrow(self.fleet.active, now))) or "none")
        if check != OPERATOR:
            self.bus.emit(ev.RolloutCheckFailed(check))
        self.bus.emit(ev.RolloutSettled("rolled_back", r.gen.number, check=check, detail=why,
                                        took=now - r.began_at))
        what = why if check == OPERATOR else f"check {check} failed: {why}"
        log.error("rollout: generation %d rolled back after %.3fs: %s; generation %d keeps serving",
                  r.gen.number, now - r.began_at, what, r.previous)
        return f"rolled back: {what}"

    def _stop(self, r: Rollout) -> None:
        for check in r.checks:
            check.stop()
        self.current = None
