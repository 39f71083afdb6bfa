"""One generation of workers and its state machine.

    STARTING --all workers ready--> ACTIVE --successor ACTIVE--> DRAINING --all exited--> RETIRED
       |                                                            '--drain deadline: SIGKILL--> RETIRED
       '--a worker exits / ready timeout / spawn error--> FAILED --all exited--> RETIRED

Invariants (the fleet, core/fleet.py, keeps the cross-generation ones):
- At most one STARTING and one ACTIVE generation exist at a time.
- A generation is drained only after its successor is ACTIVE.
- A FAILED generation's workers are drained, not SIGKILLed at once: a worker
  that was already accepting may hold connections, and killing it would reset
  them. They get the drain signal and SIGKILL only at the drain deadline.
- A worker that dies while its generation is ACTIVE is respawned into its slot
  after an exponential back-off; after `restart.crash_loop` consecutive quick
  crashes the slot is given up (FATAL) and reported, not respawned forever.

Events cost O(1): live workers are indexed by pid (`_set_pid` alone changes a pid), and
a STARTING generation counts READY workers, so the O(N) all-ready check runs once.
Nothing here makes a syscall: processes go through the fleet's `Launcher`, and time is
the `now` argument, so unit tests drive it with a fake clock and a fake launcher.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import signal
from dataclasses import dataclass, field
from typing import Mapping, Protocol

from upgraderd.config.schema import Config
from upgraderd.errors import SpawnError
from upgraderd.core import readiness as readinessmod
from upgraderd.core.handover import number, optional_number, records
from upgraderd.core.readiness import Readiness
from upgraderd.core.seams import Exit

log = logging.getLogger("upgraderd")

STABLE_AFTER = 10.0   # a worker up this long before it died is not part of a crash loop


class GenerationState(enum.Enum):
    STARTING = "starting"
    ACTIVE = "active"
    DRAINING = "draining"
    FAILED = "failed"
    RETIRED = "retired"


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    DRAINING = "draining"
    EXITED = "exited"
    FATAL = "fatal"


LIVE_WORKER = (WorkerState.STARTING, WorkerState.READY, WorkerState.DRAINING)


@dataclass
class Worker:
    """One worker slot of a generation and the process currently in it."""

    slot: int
    pid: int | None = None
    state: WorkerState = WorkerState.STARTING
    started_at: float = 0.0
    ready_at: float | None = None
    crashes: int = 0
    respawn_at: float = 0.0
    kill_at: float | None = None
    killed: bool = False
    retiring: bool = False
    last_exit: Exit | None = None


class Launcher(Protocol):
    """How a generation starts and signals its processes (core/fleet.py `FleetLauncher` implements it)."""

    def spawn_worker(self, gen: Generation, slot: int) -> int | None:
        """Start `slot` of `gen`: return its pid, None if it comes later (`on_spawned`), or raise SpawnError."""

    def signal_worker(self, pid: int, sig: int) -> None:
        """Send `sig` to worker `pid`."""


@dataclass
class Generation:
    """A numbered set of workers started from one config."""

    number: int
    config: Config
    launcher: Launcher
    created_at: float
    state: GenerationState = GenerationState.STARTING
    workers: dict[int, Worker] = field(default_factory=dict)
    changed_at: float = 0.0
    active_at: float | None = None
    drain_started_at: float | None = None
    reason: str = ""
    readiness: Readiness | None = field(default=None, repr=False)
    _by_pid: dict[int, Worker] = field(default_factory=dict, init=False, repr=False, compare=False)  # see _set_pid
    _readied: int = field(default=0, init=False, repr=False, compare=False)   # READY while STARTING
    crashed: int = 0                     # worker exits while ACTIVE (a rollout's `crashes` check)
    last_crash: str = ""
    runs: int = 0        # the generation whose release it runs: a rollback's (core/previous.py); 0: its own
    check_urls: dict[int, str] = field(default_factory=dict)   # slot -> rollout.checks.http.url

    def __post_init__(self) -> None:
        if self.readiness is None:
            self.readiness = readinessmod.for_spec(self.config.ready)

    def _set_pid(self, w: Worker, pid: int | None) -> None:
        """Set (or clear) `w`'s pid and keep the pid index in step."""
        if w.pid is not None and self._by_pid.get(w.pid) is w:
            del self._by_pid[w.pid]
        w.pid = pid
        if pid is not None:
            self._by_pid[pid] = w

    def _live(self, pid: int) -> Worker | None:
        """Return the live worker with `pid`, if it is one of ours."""
        w = self._by_pid.get(pid)
        return w if w is not None and w.pid == pid and w.state in LIVE_WORKER else None

    @property
    def ready_rule(self) -> Readiness:
        """Return this generation's readiness strategy."""
        assert self.readiness is not None
        return self.readiness

    def export(self) -> dict[str, object]:
        """Return this generation's runtime state as plain data, for a master re-exec."""
        workers = [{**dataclasses.asdict(w), "state": w.state.name, "last_exit": None} for w in self.workers.values()]
        return {"number": self.number, "state": self.state.name, "created_at": self.created_at,
                "changed_at": self.changed_at, "active_at": self.active_at,
                "drain_started_at": self.drain_started_at, "reason": self.reason, "workers": workers, "runs": self.runs}

    @classmethod
    def adopt(cls, data: Mapping[str, object], config: Config, launcher: Launcher,
              readiness: Readiness) -> Generation:
        """Rebuild a generation that an old master exported (`export()`, carried as JSON)."""
        gen = cls(int(number(data["number"])), config, launcher, created_at=number(data["created_at"]),
                  state=GenerationState[str(data["state"])], changed_at=number(data["changed_at"]),
                  active_at=optional_number(data["active_at"]),
                  drain_started_at=optional_number(data["drain_started_at"]),
                  reason=str(data["reason"]), readiness=readiness, runs=int(number(data.get("runs", 0))))
        for w in records(data["workers"]):
            worker = Worker(**{**w, "state": WorkerState[str(w["state"])], "pid": None})  # type: ignore[arg-type]  # as exported
            gen.workers[worker.slot] = worker
            pid = optional_number(w["pid"])
            gen._set_pid(worker, None if pid is None else int(pid))
        return gen

    def start(self, now: float, slots: int | None = None) -> None:
        """Spawn every slot (or the first `slots`: a canary); a spawn error fails the generation at once."""
        self.changed_at = now
        for slot in range(self.config.workers.count if slots is None else slots):
            self.workers[slot] = Worker(slot)
            if not self._spawn(self.workers[slot], now):
                return

    def _spawn(self, w: Worker, now: float) -> bool:
        w.started_at = now
        try:
            pid = self.launcher.spawn_worker(self, w.slot)
        except SpawnError as e:
            self._set_pid(w, None)
            w.state = WorkerState.EXITED
            if self.state is GenerationState.STARTING:
                self._fail(now, f"slot {w.slot}: {e}")
            else:
                self._crashed(w, now, str(e))
            return False
        self._set_pid(w, pid)
        w.state, w.ready_at, w.killed = WorkerState.STARTING, None, False
        log.debug("generation %d slot %d: spawned pid %s", self.number, w.slot, w.pid)
        return True

    def on_spawned(self, slot: int, pid: int, now: float) -> bool:
        """Record the pid of a worker whose spawn returned none; return False if unwanted."""
        w = self.workers.get(slot)
        if w is None or w.pid is not None or w.state is not WorkerState.STARTING \
                or self.state not in (GenerationState.STARTING, GenerationState.ACTIVE):
            return False
        self._set_pid(w, pid)
        return True

    def fail_start(self, now: float, why: str) -> None:
        """Fail this STARTING generation for a reason outside its workers."""
        if self.state is GenerationState.STARTING:
            # STARTING -> FAILED
            self._fail(now, why)

    def pids(self) -> dict[int, Worker]:
        """Return the live workers by pid."""
        return {pid: w for pid, w in self._by_pid.items() if w.state in LIVE_WORKER}

    def has(self, pid: int) -> bool:
        """Return True if `pid` is a live worker of this generation."""
        return self._live(pid) is not None

    def starting_pids(self) -> list[int]:
        """Return the pids of the workers that are not ready yet."""
        return [pid for pid, w in self.pids().items() if w.state is WorkerState.STARTING]

    def _transition(self, to: GenerationState, now: float, *allowed: GenerationState) -> None:
        if self.state not in allowed:
            raise RuntimeError(f"generation {self.number}: illegal {self.state.name} -> {to.name}")
        log.info("generation %d %s -> %s after %.3fs", self.number, self.state.name, to.name,
                 now - self.changed_at)
        self.state, self.changed_at = to, now

    # -- events --

    def on_ready(self, pid: int, now: float) -> bool:
        """Record READY=1 from `pid`; return False if it is not a starting worker here."""
        w = self._live(pid)
        if w is None or w.state is not WorkerState.STARTING:
            return False
        w.state, w.ready_at = WorkerState.READY, now
        if self.state is not GenerationState.STARTING:
            return True
        self._readied += 1   # a STARTING generation's workers only ever get READY, once
        if self._readied >= len(self.workers) and all(
                x.state is WorkerState.READY for x in self.workers.values()):
            # STARTING -> ACTIVE
            self._transition(GenerationState.ACTIVE, now, GenerationState.STARTING)
            self.active_at = now
        return True

    def on_exit(self, pid: int, exit: Exit, now: float) -> bool:
        """Record that worker `pid` exited; return False if it is not ours."""
        w = self._live(pid)
        if w is None:
            return False
        self._set_pid(w, None)
        w.last_exit, w.state = exit, WorkerState.EXITED
        if w.retiring:
            del self.workers[w.slot]
            log.info("generation %d slot %d: retired (pid %d %s)", self.number, w.slot, pid, exit.describe())
        elif self.state is GenerationState.STARTING:
            # STARTING -> FAILED
            self._fail(now, f"slot {w.slot} (pid {pid}) exited at start-up: {exit.describe()}")
        elif self.state is GenerationState.ACTIVE:
            self._crashed(w, now, f"pid {pid} {exit.describe()}")
        else:
            self._retire_if_empty(now)
        return True

    def serving_slots(self) -> list[int]:
        """Return the slots whose sockets must stay open: those of a STARTING or ACTIVE
        generation that are not given up or retiring (a socket nobody will accept on
        again would hold connections forever)."""
        if self.state not in (GenerationState.STARTING, GenerationState.ACTIVE):
            return []
        return [s for s, w in self.workers.items() if w.state is not WorkerState.FATAL and not w.retiring]

    def add_slot(self, now: float, slot: int | None = None) -> int:
        """Start one more worker in a new slot (or in the free `slot`) of this ACTIVE generation; return it."""
        slot = max(self.workers, default=-1) + 1 if slot is None else slot
        self.workers[slot] = Worker(slot)
        self._spawn(self.workers[slot], now)
        return slot

    def remove_slot(self, now: float, slot: int | None = None) -> int | None:
        """Drain the highest slot (or `slot`) of this ACTIVE generation; return it, or None if only one is left."""
        candidates = [s for s, w in self.workers.items() if not w.retiring]
        if len(candidates) <= 1 or (slot is not None and slot not in candidates):
            return None
        w = self.workers[max(candidates) if slot is None else slot]
        w.retiring = True
        if w.pid is None or w.state not in LIVE_WORKER:
            del self.workers[w.slot]
            return w.slot
        w.state, w.kill_at = WorkerState.DRAINING, now + self.config.drain.timeout
        self.launcher.signal_worker(w.pid, self.config.drain_signal)
        return w.slot

    def _crashed(self, w: Worker, now: float, why: str) -> None:
        self.crashed, self.last_crash = self.crashed + 1, f"slot {w.slot} {why}"
        if now - w.started_at >= STABLE_AFTER:
            w.crashes = 0
        w.crashes += 1
        r = self.config.restart
        if w.crashes >= r.crash_loop:
            w.state = WorkerState.FATAL
            log.error("generation %d slot %d: crash loop (%d crashes in a row, last: %s); "
                      "not respawning it; send HUP to start a fresh generation",
                      self.number, w.slot, w.crashes, why)
            return
        delay = min(r.backoff * 2 ** (w.crashes - 1), r.max_backoff)
        w.state, w.respawn_at = WorkerState.BACKOFF, now + delay
        log.warning("generation %d slot %d: worker died (%s); respawning in %.2fs",
                    self.number, w.slot, why, delay)

    def _fail(self, now: float, why: str) -> None:
        self.reason = why
        # STARTING -> FAILED
        self._transition(GenerationState.FAILED, now, GenerationState.STARTING)
        log.error("generation %d failed: %s; the serving generation is untouched", self.number, why)
        self._signal_all(now)
        self._retire_if_empty(now)

    def drain(self, now: float) -> None:
        """Ask every worker to stop: ACTIVE (or STARTING, at shutdown) -> DRAINING."""
        # ACTIVE -> DRAINING, STARTING -> DRAINING (only when the master stops)
        self._transition(GenerationState.DRAINING, now, GenerationState.ACTIVE, GenerationState.STARTING)
        self._signal_all(now)
        self._retire_if_empty(now)

    def stop_fast(self, now: float, sig: int, grace: float) -> None:
        """Send `sig` to every worker now and SIGKILL whatever is left after `grace`."""
        if self.state in (GenerationState.ACTIVE, GenerationState.STARTING):
            # ACTIVE -> DRAINING, STARTING -> DRAINING (fast stop)
            self._transition(GenerationState.DRAINING, now, GenerationState.ACTIVE, GenerationState.STARTING)
        if self.state is GenerationState.RETIRED:
            return
        self._signal_all(now, sig, grace)
        self._retire_if_empty(now)

    def _signal_all(self, now: float, sig: int | None = None, timeout: float | None = None) -> None:
        sig = self.config.drain_signal if sig is None else sig
        timeout = self.config.drain.timeout if timeout is None else timeout
        if self.drain_started_at is None:
            self.drain_started_at = now
        for w in self.workers.values():
            if w.state in (WorkerState.BACKOFF, WorkerState.FATAL):
                w.state = WorkerState.EXITED
            if w.pid is None or w.state not in LIVE_WORKER:
                continue
            deadline = now + timeout
            w.state = WorkerState.DRAINING
            w.kill_at = deadline if w.kill_at is None else min(w.kill_at, deadline)
            self.launcher.signal_worker(w.pid, sig)

    def _retire_if_empty(self, now: float) -> None:
        if any(w.state in LIVE_WORKER for w in self._by_pid.values()):   # the first one, as a rule
            return
        # DRAINING -> RETIRED, FAILED -> RETIRED
        self._transition(GenerationState.RETIRED, now, GenerationState.DRAINING, GenerationState.FAILED)

    # -- time --

    def tick(self, now: float) -> None:
        """Act on every deadline that has passed by `now`."""
        if self.state is GenerationState.STARTING:
            self._tick_starting(now)
        elif self.state is GenerationState.ACTIVE:
            self._tick_active(now)
        elif self.state in (GenerationState.DRAINING, GenerationState.FAILED):
            self._tick_draining(now)

    def _tick_starting(self, now: float) -> None:
        self._ready_by_delay(now)
        if self.state is GenerationState.STARTING and now >= self.created_at + self.config.ready.timeout:
            late = sorted(w.slot for w in self.workers.values() if w.state is not WorkerState.READY)
            # STARTING -> FAILED
            self._fail(now, f"not ready within {self.config.ready.timeout:g}s "
                            f"(slots {', '.join(map(str, late))} {self.ready_rule.failure})")

    def _ready_by_delay(self, now: float) -> None:
        if self.ready_rule.ready_at(0.0) is None:   # time alone makes none ready: skip the O(N) walk
            return
        for pid, w in list(self.pids().items()):
            due = self.ready_rule.ready_at(w.started_at)
            if w.state is WorkerState.STARTING and due is not None and now >= due:
                self.on_ready(pid, now)

    def _tick_active(self, now: float) -> None:
        self._ready_by_delay(now)
        self._tick_draining(now)
        for w in list(self.workers.values()):
            if w.state is WorkerState.BACKOFF and now >= w.respawn_at:
                log.info("generation %d slot %d: respawning", self.number, w.slot)
                self._spawn(w, now)

    def _tick_draining(self, now: float) -> None:
        for pid, w in self._by_pid.items():   # every worker in the index is live
            if w.kill_at is not None and now >= w.kill_at and not w.killed:
                log.warning("generation %d slot %d: pid %d still running after drain timeout "
                            "%gs; SIGKILL", self.number, w.slot, pid, self.config.drain.timeout)
                self.launcher.signal_worker(pid, signal.SIGKILL)
                w.killed = True

    def next_deadline(self) -> float | None:
        """Return the earliest time `tick` has something to do, or None."""
        times: list[float] = []
        if self.state is GenerationState.STARTING:
            times.append(self.created_at + self.config.ready.timeout)
        times += [due for w in self.workers.values()
                  if w.state is WorkerState.STARTING and (due := self.ready_rule.ready_at(w.started_at)) is not None]
        times += [w.respawn_at for w in self.workers.values() if w.state is WorkerState.BACKOFF]
        times += [w.kill_at for w in self.workers.values()
                  if w.kill_at is not None and not w.killed and w.state is WorkerState.DRAINING]
        return min(times) if times else None
