"""The master: it coordinates the phases of one pass of the loop, and owns no other state.

Each pass (system/posix.py blocks in `select`, then calls `step`) applies
signals, reads notify messages, reaps children, advances readiness probes,
ticks every generation with `now`, then settles: a level-triggered phase that
recomputes what to do from the generations' states (promote a new ACTIVE
generation and drain its predecessor, record the reload's outcome, forget
retired generations, close sockets nothing uses, start a queued reload). A
missed event therefore cannot wedge the master. A pass publishes its snapshot,
says the outcomes it settled (log, systemd, pidfile), then ends (status file, `log`).

The state belongs to owners, each the only writer of its fields, built by
`assemble` (called by service/runner.py) with the narrow seams it needs:
- the fleet (core/fleet.py): generations, launches, prefork templates, the stop;
- the reloads (core/reloads.py): HUPs, the file watch, outcomes, the config in service;
- the slots (core/slots.py): scaling, steering, rescue, retiring sockets;
- the re-exec (core/selfexec.py): USR2;
- the publisher (core/publish.py): the snapshot and the metrics endpoint;
- the tally (core/stats.py): every counter, from the events on the bus (core/events.py).

Invariants:
- At most one STARTING generation; HUPs during STARTING coalesce into one more reload.
- The predecessor is drained only once its successor is ACTIVE.
- A failed reload (bad config, bind error, worker crash, ready timeout) leaves
  the ACTIVE generation and its sockets untouched.
- No exception inside a pass ends the master: it is logged, counted
  (upgraderd_internal_errors_total) and the pass goes on with its next phase.

Known hazard: in `reuseport` mode a reload that raises `workers.count` binds
the new slots' sockets at once, and the kernel sends them connections before
the new generation is ready; if it fails, closing them resets what queued
there unless net.ipv4.tcp_migrate_req=1 (counted in slot_retire_risks).
"""

from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING, Callable, Iterable

from upgraderd import __version__
from upgraderd.core import events as ev
from upgraderd.core import snapshot
from upgraderd.core.eventlog import LogLines
from upgraderd.core.fleet import FAST_STOP_GRACE, Fleet, FleetSeams
from upgraderd.core.handover import Handover
from upgraderd.core.publish import Publisher
from upgraderd.core.reloads import Reloads, ReloadSeams
from upgraderd.core.selfexec import SelfExec, SelfExecSeams
from upgraderd.core.slots import Slots
from upgraderd.core.stats import Tally

if TYPE_CHECKING:   # names for annotations only: the master needs no more modules than its owners'
    from upgraderd.config.schema import Config
    from upgraderd.core.generation import Generation
    from upgraderd.core.publish import MetricsStarter
    from upgraderd.core.seams import System
    from upgraderd.core.stats import Stats
    from upgraderd.core.takeover import Takeover

log = logging.getLogger("upgraderd")

__all__ = ["FAST_STOP_GRACE", "Master", "assemble"]


def assemble(config_path: str, system: System, *, bus: ev.Bus | None = None,
             clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
             argv: list[str] | None = None, handover: Handover | None = None,
             metrics: MetricsStarter | None = None, takeover: Takeover | None = None,
             handover_fds: Callable[[], dict[str, int]] = dict,
             pending_signals: Callable[[], Iterable[int]] = tuple) -> Master:
    """Build the owners over `system` and the master that coordinates them.

    `bus`: where the service around the master subscribed (a fresh one if
    None); `metrics`: starts the endpoint (None: none, as in unit tests);
    `takeover`: a dead master's workers to drain once we serve (built on the same bus);
    `handover_fds` and `pending_signals`: what a USR2 re-exec passes on.
    """
    bus = bus or ev.Bus()
    tally = Tally(bus)
    LogLines(bus)
    publisher = Publisher(metrics, clock, bus, handover.metrics if handover else None)
    fleet = Fleet(FleetSeams(
        system.procs, system.notify, system.probes, system.reserve_port, system.listeners.child_fds,
        system.environ, system.user_env, system.templates, publisher.worker_env), bus, clock)
    slots = Slots(fleet, system.listeners, system.kernel, system.rescue, bus, system.strangers)
    reloads = Reloads(ReloadSeams(config_path, system.load_config, system.listeners.ensure, system.tell_systemd,
                                  wall, system.watcher, system.procs, system.check_probes, system.environ,
                                  system.rollout_requests, publisher.read_requests),
                      fleet, bus, slots.check_kernel, (slots.warn_growth, publisher.check_reload))
    argv = argv if argv is not None else ["run", "-c", config_path]
    selfexec = SelfExec(SelfExecSeams(config_path, system.load_config, system.procs, system.self_command,
                                      system.environ, system.exec_master, system.tell_systemd, argv,
                                      pending_signals), reloads, bus, clock)
    return Master(config_path, system, bus, clock, wall, tally, fleet, reloads, slots, selfexec, publisher,
                  takeover, handover, handover_fds)


class Master:
    """Run generations of workers for one config file: the phases of each pass, in order."""

    def __init__(self, config_path: str, system: System, bus: ev.Bus, clock: Callable[[], float],
                 wall: Callable[[], float], tally: Tally, fleet: Fleet, reloads: Reloads, slots: Slots,
                 selfexec: SelfExec, publisher: Publisher, takeover: Takeover | None,
                 handover: Handover | None, handover_fds: Callable[[], dict[str, int]]) -> None:
        self.config_path, self.system, self.bus, self.clock = config_path, system, bus, clock
        self.tally, self.fleet, self.reloads, self.slots = tally, fleet, reloads, slots
        self.selfexec, self.publisher, self.takeover = selfexec, publisher, takeover
        self.handover, self.handover_fds = handover, handover_fds
        self.started_at, self.wall_started_at = clock(), wall()   # carried over a USR2 re-exec
        self._prepared: Config | None = None
        self._handlers: dict[signal.Signals, Callable[[float], None]] = {
            signal.SIGHUP: reloads.hup, signal.SIGTERM: self._on_term, signal.SIGQUIT: self._on_term,
            signal.SIGINT: self._on_int, signal.SIGUSR1: self._on_usr1, signal.SIGUSR2: self._on_usr2,
            signal.SIGTTIN: slots.add_worker, signal.SIGTTOU: slots.remove_worker, signal.SIGWINCH: reloads.ask}

    # -- read-only views, for the loop and for tests --

    @property
    def generations(self) -> list[Generation]:
        """Return the generations, oldest first."""
        return self.fleet.generations

    @property
    def active(self) -> Generation | None:
        """Return the ACTIVE generation."""
        return self.fleet.active

    @property
    def starting(self) -> Generation | None:
        """Return the STARTING generation."""
        return self.fleet.starting

    @property
    def stopping(self) -> bool:
        """Return True once the master has begun to stop."""
        return self.fleet.stopping

    @property
    def config(self) -> Config | None:
        """Return the config of the serving generation."""
        return self.reloads.config

    @property
    def stats(self) -> Stats:
        """Return the counters (read them; the tally alone writes them)."""
        return self.tally.stats

    @property
    def exit_code(self) -> int:
        """Return the code the master exits with."""
        return self.reloads.exit_code

    @property
    def running(self) -> bool:
        """Return True while a generation is left, or a dead master's orphans we took over still
        drain (`stop` after a restart must not leave them serving): the loop ends when neither is."""
        return bool(self.fleet.generations) or (self.takeover is not None and not self.takeover.done)

    # -- start and stop --

    def prepare(self, cfg: Config) -> None:
        """Bind `cfg`'s listeners (or adopt a USR2 predecessor's); raise OSError naming the address.

        The runner calls this before daemonizing, so that a bind error still
        reaches the operator's terminal and the bound fds can be preserved.
        """
        if self.handover is not None:
            self.system.listeners.adopt(self.handover.listeners)
        else:
            self.system.listeners.ensure(cfg)
        self._prepared = cfg

    def start(self) -> None:
        """Start the metrics, then generation 1 (or adopt a USR2 predecessor's workers)."""
        cfg = self._prepared
        if cfg is None:
            cfg = self.system.load_config(self.config_path)
            self.prepare(cfg)
        self.publisher.start(cfg.metrics)
        if self.handover is not None:
            self._adopt(self.handover)
        else:
            self.reloads.first(cfg, self.clock())

    def _adopt(self, record: Handover) -> None:
        """Take over the workers and figures of the master we were exec'd from, then queue a reload."""
        self.tally.restore(record.stats)
        self.started_at, self.wall_started_at = record.started_at, record.wall_started_at
        self.fleet.adopt(record.generations, int(record.next_number))
        active = self.fleet.active
        hups = record.stats.get("hups", 0)
        self.reloads.adopt(active.config if active else None, hups if isinstance(hups, int) else 0, self.clock())
        pids = [p for g in self.fleet.generations for p in g.pids()]
        log.info("upgraderd %s: upgraded the master in place (same pid); adopted %d workers of generations %s; "
                 "rolling a new generation", __version__, len(pids),
                 ", ".join(str(g.number) for g in self.fleet.generations) or "none")

    def _record(self) -> Handover:
        """Return the hand-over a USR2 re-exec passes to the new master, gathered from every owner."""
        return Handover(
            listeners=self.system.listeners.export(), notify_fd=self.system.notify.fileno(),
            next_number=self.fleet.next_number, stats=self.tally.stats.export(),
            started_at=self.started_at, wall_started_at=self.wall_started_at,
            generations=self.fleet.export(), metrics=self.publisher.export(), fds=self.handover_fds())

    def close(self) -> None:
        """Release what the master started (the metrics endpoint); the loop calls it at exit."""
        self.publisher.close()

    # -- signals --

    def _on_usr1(self, now: float) -> None:
        self.bus.emit(ev.LogReopenAsked())
        log.info("reopened the log file (SIGUSR1)")

    def _on_usr2(self, now: float) -> None:
        if self.stopping:
            log.info("received SIGUSR2 while stopping: ignored")
            return
        self.selfexec.request()

    def _on_term(self, now: float) -> None:
        if self.stopping:
            return
        log.info("graceful stop: draining every generation")
        self.system.tell_systemd("STOPPING=1")
        self.fleet.stop("graceful", now)

    def _on_int(self, now: float) -> None:
        if self.fleet.stop_mode == "fast":
            return
        log.info("fast stop: SIGKILL in %gs", FAST_STOP_GRACE)
        self.system.tell_systemd("STOPPING=1")
        self.fleet.stop("fast", now)

    # -- one pass --

    def step(self, signals: set[signal.Signals]) -> None:
        """Run one pass of the loop after `select` returned."""
        now = self.clock()
        for sig in sorted(signals):
            handler = self._handlers.get(sig)
            if handler is not None:
                self._guarded(f"handling {sig.name}", handler, now)
        self._guarded("reading notify messages", self.fleet.read_notify, now)
        self._guarded("reaping workers", self.reap, now)
        self._guarded("polling readiness probes", self.fleet.poll_probes, now)
        for g in list(self.fleet.generations):
            self._guarded(f"ticking generation {g.number}", g.tick, now)
        self._guarded("watching files", self.reloads.watch_files, now)
        self._guarded("settling", self._settle, now)
        self._guarded("steering and checking the port groups", self.slots.steer_and_check, now)
        snap = self.snapshot(self.clock())
        self.publisher.publish(snap)
        self._guarded("saying the reloads' outcomes", lambda _: self.reloads.announce(), now)
        self.bus.emit(snapshot.PassEnded(snap, self.config))   # then a reloaded `log` section applies

    def _guarded(self, what: str, fn: Callable[[float], object], now: float) -> None:
        try:
            fn(now)
        except Exception:
            self.bus.emit(ev.InternalError(what))
            log.exception("internal error while %s; the master carries on", what)

    def timeout(self, now: float | None = None) -> float:
        """Return how long the loop may block in select."""
        now = self.clock() if now is None else now
        due = [*self.fleet.deadlines(), self.selfexec.next_deadline(), *self.reloads.deadlines(),
               self.slots.next_deadline(now)]
        return max(0.0, min(1.0, min((d for d in due if d is not None), default=now + 1.0) - now))

    def reap(self, now: float) -> None:
        """Collect exited children: the re-exec's preflight, then templates and workers."""
        self.fleet.reap(self.reloads.claim(self.selfexec.claim(self.system.procs.reap())), now)

    def _settle(self, now: float) -> None:
        self.slots.steer()   # a predecessor's extra slots get nothing new before it drains
        self.fleet.drain_superseded(now)
        self.reloads.settle(now)
        if self.takeover is not None:
            cfg = self.config
            self.takeover.settle(now, self.active is not None or self.stopping,
                                 cfg.drain.timeout if cfg is not None else None)
        self.fleet.forget_retired(now)
        self.slots.close_unused()
        self.fleet.flush_notices(now)
        if self.stopping or self.starting is not None or self.reloads.busy:
            return
        self.selfexec.settle(now, self._record)
        self.reloads.run_queued(now)

    def snapshot(self, now: float) -> snapshot.Snapshot:
        """Return the reported state at `now` (what the metrics, the status file and `status` show)."""
        configs = [g.config for g in self.fleet.generations] + ([self.config] if self.config else [])
        return snapshot.take(snapshot.Times(self.started_at, self.wall_started_at, now), self.config_path,
                             self.fleet.generations, self.config, self.tally.stats, self.stopping,
                             self.slots.tcp_migrate_req, self.slots.worker_bind_reset_risk(configs),
                             self.reloads.progress(), self.slots.strangers, self.fleet.previous.live())
