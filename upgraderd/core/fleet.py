"""The fleet: the owner of the generations, their workers' launches and prefork templates.

The fleet is the only writer of the generation list, the next generation's
number, the prefork templates (core/prefork.py) and the stop mode. It starts
workers through the `FleetSeams` it is built with (processes, templates, the
sockets each slot inherits, the notify address, the metrics' environment),
applies what workers say (notify messages, probe answers) and what became of
them (reaped exits), and reports to the bus (core/events.py): a worker exited,
was restarted or was SIGKILLed at its drain deadline, a template started, a
generation retired, a notify message was ignored.

Invariants (the cross-generation ones of docs/architecture.md):
- At most one STARTING generation: only the reloads (core/reloads.py) start
  one, and only while none is STARTING.
- The predecessor is drained only once its successor is ACTIVE
  (`drain_superseded`), and not while that successor is a held canary
  (`held`, core/rollout.py): `active` is then still the predecessor.
- Once stopping, the fleet never leaves it; the loop ends when the list is empty.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from upgraderd.config.schema import Config
from upgraderd.core import events as ev
from upgraderd.core import readiness
from upgraderd.core.generation import Generation, GenerationState, WorkerState
from upgraderd.core.handover import config_from_dict, config_to_dict
from upgraderd.core.launch import Context, describe
from upgraderd.core.notices import NotifyJudge
from upgraderd.core.prefork import Prefork
from upgraderd.core.previous import Kept, Previous
from upgraderd.core.seams import Exit, NotifyAPI, ProbeAPI, ProcessAPI, TemplateAPI
from upgraderd.errors import SpawnError

log = logging.getLogger("upgraderd")

FAST_STOP_GRACE = 1.0


@dataclass(frozen=True)
class FleetSeams:
    """What the fleet needs of the OS and of the metrics, and nothing more."""

    procs: ProcessAPI
    notify: NotifyAPI
    probes: ProbeAPI
    reserve_port: Callable[[], int]
    # The fds worker `slot` of generation `gen` of `cfg` inherits (ListenerAPI.child_fds).
    child_fds: Callable[[Config, int, int], tuple[int, ...]]
    environ: Mapping[str, str]
    user_env: Callable[[str | None], dict[str, str]]
    templates: TemplateAPI | None
    # What a worker of `cfg` needs to report its metrics ({} without a metrics endpoint).
    worker_env: Callable[[Config], Mapping[str, str]]


class FleetLauncher:
    """The `Launcher` the fleet's generations start and signal their workers through."""

    def __init__(self, seams: FleetSeams, prefork: Prefork, bus: ev.Bus, clock: Callable[[], float],
                 fast_stop: Callable[[], bool]) -> None:
        self.seams, self.prefork, self.bus, self.clock, self.fast_stop = seams, prefork, bus, clock, fast_stop
        self._context: tuple[int, Context] | None = None   # (generation number, its workers' context)

    def context(self, gen: Generation) -> Context:
        """Return the launch context of `gen`'s workers, made once per generation.

        Made per worker, copying the master's environment (os.environ decodes
        every name and value) and looking up the user was most of the master's
        CPU per spawn. Once per generation, its workers (respawns too) all
        see the environment the master had when the generation started.
        """
        if self._context is None or self._context[0] != gen.number:
            s = self.seams
            self._context = (gen.number, Context(dict(s.environ), s.notify.address,
                                                 s.user_env(gen.config.workers.user), s.worker_env(gen.config)))
        return self._context[1]

    def spawn_worker(self, gen: Generation, slot: int) -> int | None:
        """Start worker `slot` of `gen` with its sockets; return the pid (None: a template
        forks it, see core/prefork.py) or raise SpawnError."""
        s = self.seams
        ctx = self.context(gen)
        try:
            spec = describe(gen.config, gen.number, slot, s.child_fds(gen.config, slot, gen.number),
                            gen.ready_rule, ctx)
        except (OSError, ValueError) as e:
            raise SpawnError(f"cannot prepare the worker: {getattr(e, 'strerror', None) or e}") from None
        respawn = gen.state is GenerationState.ACTIVE and gen.workers[slot].state is WorkerState.BACKOFF
        if spec.check_url is not None:
            gen.check_urls[slot] = spec.check_url
        if gen.config.prefork:
            self.prefork.request(gen, slot, spec)
            pid = None
        else:
            pid = s.procs.spawn(spec.argv, spec.env, spec.fds, cwd=spec.cwd, user=spec.user, group=spec.group)
            gen.ready_rule.started(pid, spec.ready_url, self.clock())
        if respawn:
            self.bus.emit(ev.WorkerRestarted())
        return pid

    def signal_worker(self, pid: int, sig: int) -> None:
        """Send `sig` to worker `pid`; a SIGKILL outside a fast stop is a drain timeout."""
        if sig == signal.SIGKILL and not self.fast_stop():
            self.bus.emit(ev.DrainTimedOut(pid))
        self.seams.procs.kill(pid, sig)


class Fleet:
    """The generations, newest last, and how they start, serve and end."""

    def __init__(self, seams: FleetSeams, bus: ev.Bus, clock: Callable[[], float]) -> None:
        self.seams, self.bus = seams, bus
        self.generations: list[Generation] = []
        self.next_number = 1
        self.stop_mode: str | None = None    # graceful, fast, or failed (generation 1 failed)
        # A canary (core/rollout.py): ACTIVE beside its predecessor, which keeps serving and is
        # not drained until the rollout releases it; `active` is the predecessor meanwhile.
        self.held: Generation | None = None
        self.prefork = Prefork(seams.templates, seams.procs, bus, lambda: self.next_number)
        self.previous = Previous(self.prefork)   # the previous release's kept template
        self.judge = NotifyJudge(bus)
        self.launcher = FleetLauncher(seams, self.prefork, bus, clock, lambda: self.stop_mode == "fast")

    def generation(self, state: GenerationState) -> Generation | None:
        """Return the newest generation in `state`, if any."""
        found = [g for g in self.generations if g.state is state]
        return found[-1] if found else None

    @property
    def active(self) -> Generation | None:
        """Return the serving ACTIVE generation (a canary's predecessor until it is released)."""
        found = [g for g in self.generations if g.state is GenerationState.ACTIVE and g is not self.held]
        return found[-1] if found else None

    @property
    def starting(self) -> Generation | None:
        """Return the STARTING generation."""
        return self.generation(GenerationState.STARTING)

    @property
    def stopping(self) -> bool:
        """Return True once the master has begun to stop."""
        return self.stop_mode is not None

    def _readiness(self, cfg: Config) -> readiness.Readiness:
        return readiness.for_spec(cfg.ready, self.seams.probes, self.seams.reserve_port)

    def start_generation(self, cfg: Config, now: float, canary: int | None = None,
                         kept: Kept | None = None) -> Generation:
        """Create generation N+1 from `cfg` and spawn its workers (only `canary` of them, held
        beside the serving generation until `release`; or forked from the `kept` template)."""
        gen = Generation(self.next_number, cfg, self.launcher, created_at=now, readiness=self._readiness(cfg),
                         runs=kept.release if kept is not None else 0)
        self.next_number += 1
        self.generations.append(gen)
        if kept is not None:
            self.prefork.lend(kept.template, gen)
        count = cfg.workers.count if canary is None else canary
        log.info("generation %d STARTING: %d x %s%s", gen.number, count, " ".join(cfg.worker_argv),
                 f" (a canary of {cfg.workers.count})" if canary is not None else "")
        self.held = gen if canary is not None else None
        gen.start(now, canary)
        return gen

    def release(self, gen: Generation) -> None:
        """Stop holding the canary `gen`: promoted, it supersedes its predecessor; rolled back, it drains."""
        if self.held is gen:
            self.held = None

    def export(self) -> list[dict[str, object]]:
        """Return every generation, with its config, as plain data for a master re-exec."""
        return [{**g.export(), "config": config_to_dict(g.config)} for g in self.generations]

    def adopt(self, records: Sequence[Mapping[str, object]], next_number: int) -> None:
        """Take over the generations a USR2 predecessor exported, and its numbering."""
        self.next_number = next_number
        for data in records:
            cfg = config_from_dict(data["config"])  # type: ignore[arg-type]  # as exported
            self.generations.append(Generation.adopt(data, cfg, self.launcher, self._readiness(cfg)))

    def read_notify(self, now: float) -> None:
        """Apply every pending notify message from a worker; count strangers."""
        messages = self.prefork.on_notify(self.seams.notify.receive(), now)  # learns pids first
        owners = {pid: g for g in self.generations for pid in g.pids()}
        for pid, gen in self.judge.ready_pids(messages, owners, now):
            gen.on_ready(pid, now)

    def flush_notices(self, now: float) -> None:
        """Log the summary of ignored notify messages once its interval has passed."""
        self.judge.flush(now)

    def poll_probes(self, now: float) -> None:
        """Advance the HTTP readiness probes; mark workers that answered 2xx ready."""
        probes = self.seams.probes
        starting = {pid: g for g in self.generations for pid in g.starting_pids()}
        for pid in probes.pids() - set(starting):
            url, why = probes.remove(pid) or ("", "")
            log.info("stopped probing pid %d at %s (it is no longer starting); last attempt: %s", pid, url, why)
        for pid in probes.poll(now):
            starting[pid].on_ready(pid, now)

    def reap(self, exits: Iterable[Exit], now: float) -> None:
        """Hand each reaped child to its template's or worker's generation, and report it."""
        for ex in self.prefork.on_exits(list(exits), self.generations, now):
            self.bus.emit(ev.WorkerExited(ex.pid, ex.reason))
            if not any(g.on_exit(ex.pid, ex, now) for g in self.generations):
                log.debug("reaped pid %d that is not a worker", ex.pid)

    def drain_superseded(self, now: float) -> None:
        """Drain every ACTIVE generation but the newest: ACTIVE -> DRAINING once a successor serves."""
        active = [g for g in self.generations if g.state is GenerationState.ACTIVE and g is not self.held]
        for old in active[:-1]:
            self.previous.keep(old, active[-1], now)
            old.drain(now)
        self.previous.expire(now)

    def forget_retired(self, now: float) -> None:
        """Drop the RETIRED generations, reporting how long each served one drained."""
        for g in self.generations:
            if g.state is GenerationState.RETIRED:
                drained = g.active_at is not None and g.drain_started_at is not None
                self.bus.emit(ev.GenerationRetired(
                    g.number, now - g.drain_started_at if drained and g.drain_started_at is not None else None))
        self.generations = [g for g in self.generations if g.state is not GenerationState.RETIRED]
        if self.held is not None and self.held not in self.generations:
            self.held = None

    def stop(self, mode: str, now: float) -> None:
        """Begin to stop: graceful drains, fast signals SIGINT then SIGKILL, failed starts nothing.

        StopBegun goes out first, so a worker that gets the drain signal can
        already tell it is a stop, not a reload (worker/__init__.py `stopping`).
        """
        self.stop_mode = mode
        self.bus.emit(ev.StopBegun(mode))
        self.previous.release("the master stops")
        if mode == "graceful":
            for g in self.generations:
                if g.state in (GenerationState.STARTING, GenerationState.ACTIVE):
                    g.drain(now)
        elif mode == "fast":
            for g in self.generations:
                g.stop_fast(now, signal.SIGINT, FAST_STOP_GRACE)

    def deadlines(self) -> list[float | None]:
        """Return when the generations, probes or templates next need the loop."""
        return [*(g.next_deadline() for g in self.generations), self.seams.probes.next_deadline(),
                *self.prefork.deadlines(self.generations), self.previous.deadline()]
