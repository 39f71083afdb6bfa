"""The master: the one owner of upgraderd's mutable runtime state.

The loop blocks only in `select`, on three fds: the signal wakeup socket, the
notify socket and the HTTP readiness probes' epoll (probe.py). Each pass reads
signals and notify messages, reaps children, advances the probes,
ticks every generation with `now`, then `_settle()`s: a level-triggered step
that recomputes what to do from the generations' states (promote a new ACTIVE
generation and drain its predecessor, record a failed reload, forget retired
generations, close sockets nothing uses, start a queued reload). A missed
event therefore cannot wedge the master.

Invariants:
- At most one STARTING generation; a HUP during STARTING is queued, and any
  number of queued HUPs coalesce into one more reload.
- The predecessor is drained only once its successor is ACTIVE.
- A failed reload (bad config, bind error, worker crash, ready timeout) leaves
  the ACTIVE generation and its sockets untouched.

Known hazard: in `reuseport` mode a reload that raises `workers.count` binds
the new slots' sockets at once, and the kernel sends them connections before
the new generation is ready. If it then fails, closing those sockets resets
what queued there unless net.ipv4.tcp_migrate_req=1. `reload()` warns, and
`_close_unused()` counts it (upgraderd_slot_retire_risks_total).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import selectors
import signal
import socket
import time
from typing import Any, Callable

from upgraderd.config import schema as configmod
from upgraderd.system import kernel
from upgraderd.config import placeholders
from upgraderd.system import sockets
from upgraderd.config import plan as planmod
from upgraderd.system import reexec
from upgraderd.core import snapshot as snapshotmod
from upgraderd.config.schema import Config
from upgraderd.errors import ConfigError, FatalError, SpawnError
from upgraderd.core.generation import Generation, GenerationState, WorkerState
from upgraderd.core.hooks import Hooks
from upgraderd.metrics.telemetry import Telemetry, TelemetryStarter
from upgraderd.system.notify import NotifyServer, notify, parse_fields
from upgraderd.system.probe import Prober, reserve_port
from upgraderd.system.process import Exit, ProcessAPI, PosixProcessAPI, user_env
from upgraderd.system.signals import HANDLED, SignalInbox
from upgraderd.core.stats import Stats
from upgraderd.core.snapshot import Snapshot

log = logging.getLogger("upgraderd")

FAST_STOP_GRACE = 1.0
# Variables of the master's own environment that must not leak to workers.
PRIVATE_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "PROMETHEUS_MULTIPROC_DIR")


class Master:
    """Run generations of workers for one config file."""

    def __init__(self, config_path: str, procs: ProcessAPI | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 notify_server: NotifyServer | None = None, hooks: Hooks | None = None,
                 argv: list[str] | None = None, inherited: dict[str, Any] | None = None,
                 telemetry: TelemetryStarter | None = None) -> None:
        self.config_path = config_path
        self.hooks = hooks or Hooks()
        self.argv = argv if argv is not None else ["run", "-c", config_path]
        self.inherited = inherited
        # The metrics endpoint starts only when asked for (the CLI does): a
        # Master driven by fakes in unit tests binds no port.
        self._start_telemetry = telemetry
        self.procs = procs or PosixProcessAPI()
        self.clock = clock
        self.listeners = sockets.ListenerSet()
        if notify_server is None and inherited is not None:
            notify_fd = int(inherited["notify_fd"])
            os.set_inheritable(notify_fd, False)  # it was made inheritable only for the exec
            notify_server = NotifyServer(socket.socket(fileno=notify_fd))
        self.notify = notify_server or NotifyServer()
        self.probes = Prober()
        # net.ipv4.tcp_migrate_req as last read (None: unavailable); see kernel.py.
        self.tcp_migrate_req: int | None = None
        self.generations: list[Generation] = []
        self.config: Config | None = None
        self.stats = Stats()
        self.started_at = clock()
        self.wall_started_at = time.time()
        self._next_number = 1
        self._reload_pending_since: float | None = None
        self._watching: tuple[Generation, float] | None = None
        self._stopping: str | None = None
        self._usr2_pending = False
        self._inbox: SignalInbox | None = None
        self._prepared: Config | None = None
        self._covers = 0
        self.exit_code = 0
        self.telemetry: Telemetry | None = None
        # Rebound (never mutated) by the loop thread; read by the metrics threads.
        self.published: Snapshot | None = None
        self._handlers = {
            signal.SIGHUP: self._on_hup, signal.SIGTERM: self._on_term,
            signal.SIGQUIT: self._on_term, signal.SIGINT: self._on_int,
            signal.SIGTTIN: self._on_ttin, signal.SIGTTOU: self._on_ttou,
            signal.SIGUSR1: self._on_usr1, signal.SIGUSR2: self._on_usr2,
        }

    # -- queries --

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
        return self._stopping is not None

    def snapshot(self) -> Snapshot:
        """Return a frozen copy of what the metrics report (call it in the loop thread)."""
        return snapshotmod.take(self)

    @property
    def worker_bind_reset_risk(self) -> bool:
        """Return True if draining a worker-bind listener can reset queued connections now."""
        cfgs = [g.config for g in self.generations] + ([self.config] if self.config else [])
        bound = any(s.mode == "worker-bind" for c in cfgs for s in c.listeners)
        return bound and self.tcp_migrate_req != 1

    # -- Launcher, used by generations --

    def spawn_worker(self, gen: Generation, slot: int) -> int:
        """Start worker `slot` of `gen` with its sockets; return the pid."""
        fds = self.listeners.child_fds(gen.config, slot)
        w = gen.config.workers
        try:
            probe_port = reserve_port() if gen.config.ready.mode == "http" else None
        except OSError as e:
            raise SpawnError(f"no port for the readiness probe: {e.strerror}") from None
        values = placeholders.values(gen.config, slot, gen.number, probe_port)
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
        env.update(user_env(w.user))
        env.update(w.env)
        env.update(placeholders.environment(gen.config, values))
        env.update({
            "LISTEN_FDS": str(len(fds.fds)), "LISTEN_FDNAMES": ":".join(fds.names),
            "NOTIFY_SOCKET": self.notify.address,
            "UPGRADERD_GENERATION": str(gen.number), "UPGRADERD_SLOT": str(slot),
            "UPGRADERD_DRAIN_SIGNAL": gen.config.drain.signal,
            "UPGRADERD_HANDOFF": gen.config.drain.handoff,
            "UPGRADERD_THREADS": str(w.threads),
        })
        if self.telemetry is not None:
            env.update(self.telemetry.worker_env(gen.config))
        respawn = gen.state is GenerationState.ACTIVE and gen.workers[slot].state is WorkerState.BACKOFF
        argv = [placeholders.expand(arg, values) for arg in gen.config.worker_argv]
        pid = self.procs.spawn(argv, env, fds.fds, cwd=w.cwd, user=w.user, group=w.group)
        if respawn:
            self.stats.worker_restarts += 1
        if gen.config.ready.url is not None and gen.config.ready.mode == "http":
            self.probes.add(pid, placeholders.expand(gen.config.ready.url, values), self.clock())
        return pid

    def signal_worker(self, pid: int, sig: int) -> None:
        """Send `sig` to worker `pid`."""
        if sig == signal.SIGKILL and self._stopping != "fast":
            self.stats.drain_timeouts += 1
        self.procs.kill(pid, sig)

    # -- start, reload, stop --

    def prepare(self) -> Config:
        """Load the config and bind its listeners; raise ConfigError or FatalError.

        The CLI calls this before daemonizing, so that a bind error still reaches
        the operator's terminal, and the bound fds can be preserved. A master
        exec'd by SIGUSR2 adopts the old master's sockets instead of binding.
        """
        cfg = configmod.load(self.config_path)
        if self.inherited is not None:
            self.listeners.adopt(self.inherited["listeners"])
            self._prepared = cfg
            return cfg
        try:
            self.listeners.ensure(cfg)
        except OSError as e:
            raise FatalError(e.strerror or str(e)) from None
        self._prepared = cfg
        return cfg

    def fds(self) -> list[int]:
        """Return every fd the master must keep across daemonizing: listeners, notify, probes."""
        return [*self.listeners.filenos(), self.notify.fileno(), self.probes.fileno()]

    def start(self) -> None:
        """Load the config (unless prepared), bind its listeners and start generation 1."""
        cfg = self._prepared or self.prepare()
        if self._start_telemetry is not None:
            inherited = self.inherited.get("metrics") if self.inherited else None
            # Threads inherit the mask: with these blocked, only the main thread ever
            # takes the master's signals (see _reexec for why that matters).
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
            try:
                self.telemetry = self._start_telemetry(cfg.metrics, lambda: self.published, self.clock,
                                                       inherited=inherited)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if self.inherited is not None:
            self._adopt(self.inherited)
            return
        log.info("upgraderd %s starting: %s", _version(), planmod.diff(None, cfg).describe())
        self.check_kernel(cfg)
        self.config = cfg
        now = self.clock()
        self._watching = (self._start_generation(cfg, now), now)

    def _adopt(self, state: dict[str, Any]) -> None:
        """Take over the workers the master we were exec'd from handed us, then reload."""
        self.stats = Stats(**state["stats"])
        self._next_number = int(state["next_number"])
        self.started_at, self.wall_started_at = state["started_at"], state["wall_started_at"]
        for data in state["generations"]:
            cfg = reexec.config_from_dict(data["config"])
            self.generations.append(Generation.adopt(data, cfg, self))
        active = self.active
        self.config = active.config if active else None
        pids = [p for g in self.generations for p in g.pids()]
        log.info("upgraderd %s: upgraded the master in place (pid %d); adopted %d workers of "
                 "generations %s; rolling a new generation", _version(), os.getpid(), len(pids),
                 ", ".join(str(g.number) for g in self.generations) or "none")
        self._reload_pending_since = self.clock()

    def _on_usr2(self, now: float) -> None:
        if self._stopping:
            log.info("received SIGUSR2 while stopping: ignored")
            return
        log.info("received SIGUSR2: upgrading the master in place")
        self._usr2_pending = True

    def _reexec(self, now: float) -> None:
        """Exec the upgraderd now on disk in this process; on failure, carry on."""
        self._usr2_pending = False
        try:
            configmod.load(self.config_path)
        except ConfigError as e:
            self._reload_failed(f"master upgrade refused, the config is invalid:\n{e}", "rejected")
            return
        listeners, handover = self.listeners.export(), self.hooks.handover_fds()
        state = {
            "listeners": listeners, "notify_fd": self.notify.fileno(),
            "next_number": self._next_number, "stats": dataclasses.asdict(self.stats),
            "started_at": self.started_at, "wall_started_at": self.wall_started_at,
            "generations": [{**g.export(), "config": reexec.config_to_dict(g.config)}
                            for g in self.generations],
            "metrics": self.telemetry.export() if self.telemetry is not None else None,
            "handover": handover,
        }
        fds = [int(e["fd"]) for e in listeners] + [self.notify.fileno(), *handover.values()]
        notify_systemd(f"RELOADING=1\nMONOTONIC_USEC={int(time.monotonic() * 1e6)}")
        for handler in logging.getLogger().handlers:
            handler.flush()
        # A signal that arrived after this pass read the wakeup socket is only a byte
        # on it, and the socket dies with the exec. Block the signals, then turn each
        # such byte back into a pending signal: pending signals survive exec, and the
        # new master receives them once its handlers are in place.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        if self._inbox is not None:
            for sig in self._inbox.drain():
                os.kill(os.getpid(), sig)
        err = reexec.exec_master(state, fds, self.argv)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        log.error("master upgrade failed, carrying on as before: cannot exec %s: %s",
                  " ".join(self.argv), err)
        self.stats.reloads["failed"] += 1
        notify_systemd("READY=1\nSTATUS=master upgrade failed")

    def _start_generation(self, cfg: Config, now: float) -> Generation:
        gen = Generation(self._next_number, cfg, self, created_at=now)
        self._next_number += 1
        self.generations.append(gen)
        log.info("generation %d STARTING: %d x %s", gen.number, cfg.workers.count,
                 " ".join(cfg.worker_argv))
        gen.start(now)
        return gen

    def _on_hup(self, now: float) -> None:
        self.stats.hups += 1
        if self._stopping:
            log.info("received SIGHUP while stopping: ignored")
            return
        if self._reload_pending_since is None:
            self._reload_pending_since = now
        if self.starting is not None:
            log.info("received SIGHUP: reload queued, generation %d is still starting",
                     self.starting.number)
        else:
            log.info("received SIGHUP: reloading %s", self.config_path)

    def _queued(self) -> str:
        return "; another reload is queued" if self._reload_pending_since is not None else ""

    def reload(self, now: float, since: float) -> None:
        """Re-read the config and start a new generation; on any error keep serving."""
        notify_systemd(f"RELOADING=1\nMONOTONIC_USEC={int(time.monotonic() * 1e6)}")
        self._covers = self.stats.hups
        try:
            cfg = configmod.load(self.config_path)
            self.listeners.ensure(cfg)
        except ConfigError as e:
            self._reload_failed(str(e), "rejected")
            return
        except OSError as e:
            self._reload_failed(e.strerror or str(e), "rejected")
            return
        log.info("reload: %s", planmod.diff(self.config, cfg).describe())
        if self.active is not None and cfg.workers.count > len(self.active.workers) \
                and any(s.mode == "reuseport" for s in cfg.listeners) and sockets.retire_risk():
            # The new slots' sockets join the port group now, before the generation is
            # ready; should it fail, they close with whatever the kernel queued on them.
            log.warning("the reload adds worker slots whose sockets take connections before "
                        "generation %d is ready: if it fails, those connections are reset "
                        "(net.ipv4.tcp_migrate_req is not 1)", self._next_number)
        if self.telemetry is not None:
            self.telemetry.check_reload(cfg)
        self.check_kernel(cfg)
        self._watching = (self._start_generation(cfg, now), since)

    def _reload_failed(self, why: str, result: str, generation: int = 0) -> None:
        self._reload_settled(result, generation)
        self.stats.reloads[result] += 1
        self.stats.last_reload_ok = False
        self.stats.last_reload_error = why
        log.error("reload failed, still serving generation %s%s:\n%s",
                  self.active.number if self.active else "-", self._queued(), why)
        notify_systemd("READY=1\nSTATUS=reload failed")

    def _on_ttin(self, now: float) -> None:
        gen = self.active
        if gen is None or self._stopping:
            log.warning("received SIGTTIN: ignored, no ACTIVE generation")
            return
        try:
            # Only the new slot: a retiring slot's socket is closed on purpose, and
            # binding it again would let connections queue where nobody accepts.
            self.listeners.ensure(gen.config, slots=[max(gen.workers, default=-1) + 1])
        except OSError as e:
            log.error("received SIGTTIN: cannot add a worker: %s", e)
            return
        slot = gen.add_slot(now)
        log.info("received SIGTTIN: generation %d slot %d added, %d workers "
                 "(a reload goes back to workers.count=%d)", gen.number, slot, len(gen.workers),
                 gen.config.workers.count)

    def _on_ttou(self, now: float) -> None:
        gen = self.active
        if gen is None or self._stopping:
            log.warning("received SIGTTOU: ignored, no ACTIVE generation")
            return
        slot = gen.remove_slot(now)
        if slot is None:
            log.warning("received SIGTTOU: ignored, generation %d is down to one worker", gen.number)
            return
        log.info("received SIGTTOU: generation %d slot %d retiring, %d workers left "
                 "(a reload goes back to workers.count=%d)", gen.number, slot,
                 len([w for w in gen.workers.values() if not w.retiring]), gen.config.workers.count)

    def _reload_settled(self, result: str, generation: int) -> None:
        self.stats.last_reload_result = result
        self.stats.last_reload_generation = generation
        self.stats.last_reload_covers = self._covers

    def _on_usr1(self, now: float) -> None:
        self.hooks.on_reopen_logs()
        log.info("reopened the log file (SIGUSR1)")

    def _on_term(self, now: float) -> None:
        if self._stopping:
            return
        log.info("graceful stop: draining every generation")
        notify_systemd("STOPPING=1")
        self._stopping = "graceful"
        for g in self.generations:
            if g.state in (GenerationState.STARTING, GenerationState.ACTIVE):
                g.drain(now)

    def _on_int(self, now: float) -> None:
        if self._stopping == "fast":
            return
        log.info("fast stop: SIGKILL in %gs", FAST_STOP_GRACE)
        notify_systemd("STOPPING=1")
        self._stopping = "fast"
        for g in self.generations:
            g.stop_fast(now, signal.SIGINT, FAST_STOP_GRACE)

    # -- the loop --

    def run(self) -> int:
        """Serve until stopped; return the exit code."""
        try:
            with SignalInbox() as inbox, selectors.DefaultSelector() as sel:
                self._inbox = inbox
                sel.register(inbox.fileno(), selectors.EVENT_READ, "signal")
                sel.register(self.notify.fileno(), selectors.EVENT_READ, "notify")
                sel.register(self.probes.fileno(), selectors.EVENT_READ, "probe")
                self.start()
                self.published = self.snapshot()
                while self.generations:
                    sel.select(self._timeout(self.clock()))
                    self.step(inbox.drain())
        finally:
            if self.telemetry is not None:
                self.telemetry.close()
        self.listeners.close_all()
        self.notify.close()
        self.probes.close()
        log.info("upgraderd stopped")
        return self.exit_code

    def step(self, signals: set[signal.Signals]) -> None:
        """Run one pass of the loop after `select` returned."""
        now = self.clock()
        for sig in sorted(signals):
            handler = self._handlers.get(sig)
            if handler is not None:
                handler(now)
        self.read_notify(now)
        self.reap(now)
        self.poll_probes(now)
        for g in list(self.generations):
            g.tick(now)
        self._settle(now)
        self.published = self.snapshot()
        self.hooks.on_step(self)

    def _timeout(self, now: float) -> float:
        deadlines = [d for g in self.generations if (d := g.next_deadline()) is not None]
        if (probe_due := self.probes.next_deadline()) is not None:
            deadlines.append(probe_due)
        if not deadlines:
            return 1.0
        return max(0.0, min(1.0, min(deadlines) - now))

    def read_notify(self, now: float) -> None:
        """Apply every pending notify message from a worker; count strangers."""
        owners = {pid: g for g in self.generations for pid in g.pids()}
        for pid, data in self.notify.receive():
            gen = owners.get(pid)
            if gen is None:
                self.stats.notify_rejected += 1
                log.warning("ignored notify message from pid %d: not a worker", pid)
                continue
            try:
                fields = parse_fields(data)
            except ValueError as e:
                self.stats.notify_rejected += 1
                log.warning("ignored bad notify message from pid %d: %s", pid, e)
                continue
            # Only `ready.mode: notify` trusts READY=1: gunicorn, for one, sends it
            # before its workers have loaded the app, which is why a config says delay.
            if fields.get("READY") == "1" and gen.config.ready.mode == "notify":
                gen.on_ready(pid, now)

    def poll_probes(self, now: float) -> None:
        """Advance the HTTP readiness probes; mark workers that answered 2xx ready."""
        starting = {pid: g for g in self.generations for pid, w in g.pids().items()
                    if w.state is WorkerState.STARTING}
        for pid in self.probes.pids() - set(starting):
            url, why = self.probes.remove(pid) or ("", "")
            log.info("stopped probing pid %d at %s (it is no longer starting); last attempt: %s",
                     pid, url, why)
        for pid in self.probes.poll(now):
            starting[pid].on_ready(pid, now)

    def check_kernel(self, cfg: Config) -> None:
        """Read (and with `kernel.tcp_migrate_req: set`, set) net.ipv4.tcp_migrate_req."""
        bound = [s.name for s in cfg.listeners if s.mode == "worker-bind"]
        state = kernel.ensure_migrate_req(cfg.kernel.tcp_migrate_req, bound)
        self.tcp_migrate_req = state.value
        for line in state.info:
            log.info("%s", line)
        for line in state.warnings:
            log.warning("%s", line)

    def reap(self, now: float) -> None:
        """Collect exited children and hand each to its generation."""
        for ex in self.procs.reap():
            self.stats.worker_exits[ex.reason] += 1
            if self.telemetry is not None:
                self.telemetry.on_reaped(ex.pid)
            for g in self.generations:
                if g.on_exit(ex.pid, ex, now):
                    break
            else:
                log.debug("reaped pid %d that is not a worker", ex.pid)

    def _settle(self, now: float) -> None:
        active = [g for g in self.generations if g.state is GenerationState.ACTIVE]
        for old in active[:-1]:
            # ACTIVE -> DRAINING: only ever once a successor is ACTIVE
            old.drain(now)
        self._settle_reload(now)
        self._forget_retired(now)
        self._close_unused()
        if self._stopping is None and self.starting is None and self._usr2_pending:
            self._reexec(now)
        if self._stopping is None and self.starting is None and self._reload_pending_since is not None:
            since, self._reload_pending_since = self._reload_pending_since, None
            self.reload(now, since)
            self._settle_reload(now)

    def _settle_reload(self, now: float) -> None:
        if self._watching is None:
            return
        gen, since = self._watching
        if gen.state is GenerationState.STARTING:
            return
        self._watching = None
        if self._stopping and gen.state is not GenerationState.ACTIVE:
            log.info("generation %d stopped before it became ready: the master is stopping", gen.number)
            return
        if gen.number == 1:
            self._settle_first(gen, now)
        elif gen.state is GenerationState.ACTIVE:
            self.config = gen.config
            self._reload_settled("success", gen.number)
            self.stats.reloads["success"] += 1
            self.stats.last_reload_ok = True
            self.stats.last_reload_success_at = time.time()
            self.stats.reload_durations.observe(now - since)
            log.info("reload done: generation %d ACTIVE %.3fs after HUP%s", gen.number, now - since,
                     self._queued())
            notify_systemd(f"READY=1\nSTATUS=generation {gen.number} active")
        else:
            self._reload_failed(f"generation {gen.number}: {gen.reason}", "failed", gen.number)

    def _settle_first(self, gen: Generation, now: float) -> None:
        if gen.state is GenerationState.ACTIVE:
            log.info("serving: generation 1 ACTIVE %.3fs after start", now - gen.created_at)
            notify_systemd("READY=1\nSTATUS=generation 1 active")
            self.hooks.on_serving(self)
            return
        log.error("the first generation failed (%s); stopping", gen.reason)
        self.hooks.on_start_failed(gen.reason)
        self.exit_code = 1
        self._stopping = "failed"

    def _forget_retired(self, now: float) -> None:
        keep = []
        for g in self.generations:
            if g.state is not GenerationState.RETIRED:
                keep.append(g)
            elif g.active_at is not None and g.drain_started_at is not None:
                self.stats.drain_durations.observe(now - g.drain_started_at)
        self.generations = keep

    def _close_unused(self) -> None:
        """Close every socket no STARTING or ACTIVE slot will accept on again.

        Draining workers no longer accept, so they do not keep a socket open; a
        socket kept for them would queue connections that nobody serves.
        """
        wanted: set[sockets.SocketKey] = set()
        for g in self.generations:
            wanted |= sockets.keys_for(g.config, g.serving_slots())
        closed = self.listeners.keep_only(wanted)
        if self._stopping:
            return
        for key in closed:
            log.info("closed listener %s:%d (%s, slot %d): no slot serves it any more", *key)
        retired = [key for key in closed if key[2] == "reuseport"]
        if retired and (risk := sockets.retire_risk()) is not None:
            self.stats.slot_retire_risks += len(retired)
            log.warning("closed %d reuseport slot socket(s): %s", len(retired), risk)


def notify_systemd(message: str) -> None:
    """Tell systemd (if it started us with NOTIFY_SOCKET) about our state."""
    try:
        notify(message)
    except OSError as e:
        log.debug("sd_notify failed: %s", e)


def _version() -> str:
    from upgraderd import __version__
    return __version__
