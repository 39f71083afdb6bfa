"""The master: the one owner of upgraderd's mutable runtime state. It only decides.

Each pass of the loop (system/posix.py blocks in `select`, then calls `step`)
applies signals, reads notify messages, reaps children, advances readiness
probes, ticks every generation with `now`, then `_settle()`s: a
level-triggered step that recomputes what to do from the generations' states
(promote a new ACTIVE generation and drain its predecessor, record the
reload's outcome, forget retired generations, close sockets nothing uses,
start a queued reload). A missed event therefore cannot wedge the master.

Every action goes through a seam (core/seams.py): processes, sockets,
probes, the kernel, systemd, exec. Worker launches are described by
core/launcher.py, reloads tracked by core/reloads.py, USR2 by core/upgrade.py.

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

from upgraderd.core import launcher, readiness, reloads, slots, upgrade
from upgraderd.core import snapshot as snapshotmod
from upgraderd.core.generation import Generation, GenerationState
from upgraderd.core.hooks import Hooks
from upgraderd.core.notices import NotifyJudge
from upgraderd.errors import ConfigError, ExitCode

if TYPE_CHECKING:
    from upgraderd.config.schema import Config
    from upgraderd.core.handover import Handover
    from upgraderd.core.seams import MetricsAPI, MetricsStarter, System
    from upgraderd.core.takeover import Takeover

log = logging.getLogger("upgraderd")

FAST_STOP_GRACE = 1.0


class Master:
    """Run generations of workers for one config file."""

    def __init__(self, config_path: str, system: System, clock: Callable[[], float] = time.monotonic,
                 hooks: Hooks | None = None, argv: list[str] | None = None,
                 handover: Handover | None = None, metrics: MetricsStarter | None = None,
                 wall: Callable[[], float] = time.time, takeover: Takeover | None = None) -> None:
        self.config_path = config_path
        self.system = system
        self.clock = clock
        self.hooks = hooks or Hooks()
        self.argv = argv if argv is not None else ["run", "-c", config_path]
        self.handover = handover
        self.takeover = takeover    # a dead master's orphans, drained once we serve
        self._start_metrics = metrics   # None: no endpoint (unit tests bind no port)
        self.metrics: MetricsAPI | None = None
        self.generations: list[Generation] = []
        self.config: Config | None = None
        self.reloads = reloads.ReloadTracker(wall)
        self.stats, self.judge = self.reloads.stats, NotifyJudge(self.reloads.stats)
        self.started_at, self.wall_started_at = clock(), wall()
        self.tcp_migrate_req: int | None = None   # as last read; None: unavailable
        self.next_number = 1
        self.stopping_mode: str | None = None
        self.upgrade, self.exit_code = upgrade.Upgrade(), ExitCode.OK
        self.published: snapshotmod.Snapshot | None = None  # rebound by the loop, read by metrics
        self.pending_signals: Callable[[], Iterable[int]] = lambda: ()  # set by the loop
        self._prepared: Config | None = None
        self.spawner = launcher.Spawner(self)
        self._handlers = {
            signal.SIGHUP: self._on_hup, signal.SIGTERM: self._on_term, signal.SIGQUIT: self._on_term,
            signal.SIGINT: self._on_int, signal.SIGUSR1: self._on_usr1, signal.SIGUSR2: self._on_usr2,
            signal.SIGTTIN: lambda now: slots.add_worker(self, now),
            signal.SIGTTOU: lambda now: slots.remove_worker(self, now),
        }

    def generation(self, state: GenerationState) -> Generation | None:
        """Return the newest generation in `state`, if any."""
        found = [g for g in self.generations if g.state is state]
        return found[-1] if found else None

    @property
    def active(self) -> Generation | None:
        """Return the ACTIVE generation."""
        return self.generation(GenerationState.ACTIVE)

    @property
    def starting(self) -> Generation | None:
        """Return the STARTING generation."""
        return self.generation(GenerationState.STARTING)

    @property
    def stopping(self) -> bool:
        """Return True once the master has begun to stop."""
        return self.stopping_mode is not None

    @property
    def worker_bind_reset_risk(self) -> bool:
        """Return True if draining a worker-bind listener can reset queued connections now."""
        cfgs = [g.config for g in self.generations] + ([self.config] if self.config else [])
        bound = any(s.mode == "worker-bind" for c in cfgs for s in c.listeners)
        return bound and self.tcp_migrate_req != 1

    def prepare(self, cfg: Config) -> None:
        """Bind `cfg`'s listeners (or adopt a USR2 predecessor's); raise OSError naming the address.

        The CLI calls this before daemonizing, so that a bind error still
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
        if self._start_metrics is not None:
            inherited = self.handover.metrics if self.handover else None
            self.metrics = self._start_metrics(cfg.metrics, lambda: self.published, self.clock, inherited)
        if self.handover is not None:
            upgrade.adopt(self, self.handover)
            return
        log.info("upgraderd %s starting: %s", reloads.VERSION, reloads.plan_line(None, cfg))
        slots.check_kernel(self, cfg)
        self.config = cfg
        now = self.clock()
        self.reloads.watch(self.start_generation(cfg, now), now)

    def new_readiness(self, cfg: Config) -> readiness.Readiness:
        """Return the readiness strategy for a generation of `cfg`."""
        return readiness.for_spec(cfg.ready, self.system.probes, self.system.reserve_port)

    def start_generation(self, cfg: Config, now: float) -> Generation:
        """Create generation N+1 from `cfg` and spawn its workers."""
        gen = Generation(self.next_number, cfg, self.spawner, created_at=now, readiness=self.new_readiness(cfg))
        self.next_number += 1
        self.generations.append(gen)
        log.info("generation %d STARTING: %d x %s", gen.number, cfg.workers.count, " ".join(cfg.worker_argv))
        gen.start(now)
        return gen

    def _on_hup(self, now: float) -> None:
        self.stats.hups += 1
        if self.stopping:
            log.info("received SIGHUP while stopping: ignored")
            return
        self.reloads.hup(now)
        if self.starting is not None:
            log.info("received SIGHUP: reload queued, generation %d is still starting", self.starting.number)
        else:
            log.info("received SIGHUP: reloading %s", self.config_path)

    def reload(self, now: float, since: float) -> None:
        """Re-read the config and start a new generation; on any error keep serving."""
        self.system.tell_systemd(f"RELOADING=1\nMONOTONIC_USEC={int(now * 1e6)}")
        self.reloads.begin()
        try:
            cfg = self.system.load_config(self.config_path)
            self.system.listeners.ensure(cfg)
            log.info("reload: %s", reloads.plan_line(self.config, cfg))
            slots.warn_growth(self, cfg)
            if self.metrics is not None:
                self.metrics.check_reload(cfg)
            slots.check_kernel(self, cfg)
            self.reloads.watch(self.start_generation(cfg, now), since)
        except ConfigError as e:
            reloads.failed(self, str(e), "rejected")
        except OSError as e:
            reloads.failed(self, e.strerror or str(e), "rejected")
        except Exception as e:  # a bug: never let it take the serving generation down
            self.stats.internal_errors += 1
            log.exception("internal error while reloading")
            reloads.failed(self, f"internal error: {e!r}", "rejected")

    def _on_usr1(self, now: float) -> None:
        self.hooks.on_reopen_logs()
        log.info("reopened the log file (SIGUSR1)")

    def _on_usr2(self, now: float) -> None:
        if self.stopping:
            log.info("received SIGUSR2 while stopping: ignored")
            return
        log.info("received SIGUSR2: upgrading the master in place")
        self.upgrade.requested = True

    def _on_term(self, now: float) -> None:
        if self.stopping:
            return
        log.info("graceful stop: draining every generation")
        self.system.tell_systemd("STOPPING=1")
        self.stopping_mode = "graceful"
        for g in self.generations:
            if g.state in (GenerationState.STARTING, GenerationState.ACTIVE):
                g.drain(now)

    def _on_int(self, now: float) -> None:
        if self.stopping_mode == "fast":
            return
        log.info("fast stop: SIGKILL in %gs", FAST_STOP_GRACE)
        self.system.tell_systemd("STOPPING=1")
        self.stopping_mode = "fast"
        for g in self.generations:
            g.stop_fast(now, signal.SIGINT, FAST_STOP_GRACE)

    def step(self, signals: set[signal.Signals]) -> None:
        """Run one pass of the loop after `select` returned."""
        now = self.clock()
        for sig in sorted(signals):
            handler = self._handlers.get(sig)
            if handler is not None:
                self._guarded(f"handling {sig.name}", handler, now)
        self._guarded("reading notify messages", self.read_notify, now)
        self._guarded("reaping workers", self.reap, now)
        self._guarded("polling readiness probes", self.poll_probes, now)
        for g in list(self.generations):
            self._guarded(f"ticking generation {g.number}", g.tick, now)
        self._guarded("watching files", lambda now: self.reloads.files.step(self, now), now)
        self._guarded("settling", self._settle, now)
        self._guarded("steering", lambda _: slots.steer(self), now)
        self.published = snapshotmod.take(self)
        self.hooks.on_step(self.published, self.config)

    def _guarded(self, what: str, fn: Callable[[float], object], now: float) -> None:
        try:
            fn(now)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("internal error while %s; the master carries on", what)

    def timeout(self, now: float) -> float:
        """Return how long the loop may block in select."""
        due = [g.next_deadline() for g in self.generations]
        due += [self.system.probes.next_deadline(), self.upgrade.next_deadline(), self.reloads.files.deadline]
        due += [*self.spawner.prefork.deadlines(self.generations), slots.next_deadline(self, now)]
        return max(0.0, min(1.0, min((d for d in due if d is not None), default=now + 1.0) - now))

    def read_notify(self, now: float) -> None:
        """Apply every pending notify message from a worker; count strangers."""
        messages = self.spawner.prefork.on_notify(self.system.notify.receive(), now)  # learns pids first
        owners = {pid: g for g in self.generations for pid in g.pids()}
        for pid, gen in self.judge.ready_pids(messages, owners, now):
            gen.on_ready(pid, now)

    def poll_probes(self, now: float) -> None:
        """Advance the HTTP readiness probes; mark workers that answered 2xx ready."""
        readiness.poll_probes(self.system.probes, self.generations, now)

    def reap(self, now: float) -> None:
        """Collect exited children and hand each to its generation."""
        for ex in self.spawner.prefork.on_exits(self.system.procs.reap(), self.generations, now):
            if upgrade.on_exit(self, ex):
                continue
            self.stats.worker_exits[ex.reason] += 1
            if self.metrics is not None:
                self.metrics.on_reaped(ex.pid)
            if not any(g.on_exit(ex.pid, ex, now) for g in self.generations):
                log.debug("reaped pid %d that is not a worker", ex.pid)

    def _settle(self, now: float) -> None:
        slots.steer(self)   # a predecessor's extra slots get nothing new before it drains
        active = [g for g in self.generations if g.state is GenerationState.ACTIVE]
        for old in active[:-1]:
            old.drain(now)  # ACTIVE -> DRAINING: only ever once a successor is ACTIVE
        reloads.settle(self, now)
        if self.takeover is not None:
            self.takeover.settle(self, now)
        self._forget_retired(now)
        slots.close_unused(self)
        self.judge.flush(now)
        if self.stopping or self.starting is not None:
            return
        upgrade.settle(self, now)
        if (since := self.reloads.take()) is not None:
            self.reload(now, since)
            reloads.settle(self, now)

    def _forget_retired(self, now: float) -> None:
        for g in self.generations:
            if g.state is GenerationState.RETIRED and g.active_at is not None and g.drain_started_at is not None:
                self.stats.drain_durations.observe(now - g.drain_started_at)
        self.generations = [g for g in self.generations if g.state is not GenerationState.RETIRED]

