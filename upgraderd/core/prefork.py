"""Prefork generations: one exec'd template per generation forks every worker of it.

A generation whose config is `prefork` (core/fleet.py `FleetLauncher` asks) starts its
template with its first worker: one fresh interpreter, so the code on disk at
the HUP is what runs, that imports the app and then forks a worker per
request. The template runs apps/template.py; the master talks to it through
the `TemplateAPI` seam (system/templatectl.py).

Design note: a worker's pid is known only once the template has forked it, so
a request returns no pid. The worker stays pending (pid None, STARTING) until
`SPAWNED=<slot>:<pid>` arrives on the notify socket from the template's own
pid (SO_PASSCRED, so a worker cannot forge it). The template sends it before
it lets the worker run, so the worker's own READY=1 always comes after it. The
worker is a grandchild re-parented to the master (a child subreaper), so the
master reaps it as it reaps any worker; an exit reaped before its SPAWNED is
kept in a small buffer and applied when the pid is learned.

Invariants:
- Every worker of a generation, respawns too, is forked from that
  generation's template, never a newer one: once it is gone, a respawn fails
  (SpawnError) and the slot backs off, so no slot runs code its siblings do not.
- A template is stopped as soon as its generation is neither STARTING nor
  ACTIVE (no respawn can need it any more). Its death at start-up fails the
  generation; the ACTIVE one is untouched.
- A standby (workers.warm) has imported no app code: it is handed a
  generation's app only at that generation's start, and only if it was
  started with the same user, cwd, worker env and metrics settings, and for
  that generation's number (its exec-time UPGRADERD_GENERATION, which
  /proc/PID/environ shows for its workers too); else it is stopped and a
  fresh template is exec'd.
- A SPAWNED the generation no longer wants (it failed, or a stray slot) gets
  the drain signal, so a released worker is never left serving untracked.
- Flow control: a request the template's channel cannot take yet is queued
  (system/templatectl.py) and sent as the template reads; a full channel is not
  an error. A template that takes no request for STALL seconds while it has
  some queued is given up as if it had died: its STARTING generation fails,
  an ACTIVE one can no longer respawn.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Iterable

from upgraderd.contract import env as contract
from upgraderd.contract import standby as preload
from upgraderd.contract.notify import SPAWNED, STATUS
from upgraderd.core import events as ev
from upgraderd.core.generation import Generation, GenerationState
from upgraderd.core.notices import parse_fields
from upgraderd.core.seams import Exit, ProcessAPI, TemplateAPI
from upgraderd.errors import SpawnError

if TYPE_CHECKING:
    from upgraderd.config.schema import Config
    from upgraderd.core.launch import Launch

log = logging.getLogger("upgraderd")

# Exits of pids not (yet) known as workers, kept for a late SPAWNED.
UNKNOWN_EXITS = 256
# Stopped or dead templates remembered, so their last SPAWNED can still be judged.
REMEMBERED = 64
# A template's STATUS= is the app's exception text: untrusted, so bounded and printable.
LAST_WORDS = 300
SERVING = (GenerationState.STARTING, GenerationState.ACTIVE)
# Standbys that died on their own before the master gives up on them.
STANDBY_DEATHS = 3
# How long after a generation's template forked its last worker (or the generation
# became ACTIVE, if that came first) its successor's standby is started. Not at once,
# so the fork and the new workers' first moments do not share the CPU with an exec.
# Not later than this either: a standby that imports a framework takes most of a
# second on a busy small machine, and one still importing at the next HUP makes that
# reload wait for the rest (bench/asgi.py: HUPs 1 s apart).
STANDBY_DELAY = 0.05
# A template with queued requests that takes none for this long has stopped reading.
STALL = 10.0


def _printable(text: str) -> str:
    """Return `text` cut to LAST_WORDS characters, control characters replaced (it goes to logs)."""
    return "".join(c if c.isprintable() else "?" for c in text[:LAST_WORDS])


def _relabel(cfg: Config) -> bool:
    """Return True if a template of `cfg` may be kept to fork a later (rollback) generation."""
    return cfg.rollout.keep_previous > 0


def standby_key(cfg: Config) -> tuple[object, ...]:
    """Return what a standby must share with a generation to become its template.

    The interpreter's search path, user and working directory are fixed when
    it starts; everything else in the environment is replaced at the load.
    """
    w = cfg.workers
    return (w.cwd, w.user, w.group, tuple(sorted(w.env.items())), cfg.metrics, standby_arg(cfg))


def standby_arg(cfg: Config) -> str:
    """Return the standby's argument: what it preloads (apps/preload.py), for `cfg`'s app and `workers.preload`."""
    web = (cfg.workers.app or "").partition(":")[0] in ("asgi", "wsgi")
    return preload.arg([*((preload.ASGI,) if web else ()), *cfg.workers.preload,
                        *((preload.RECORDED,) if cfg.workers.preload_recorded else ())])


class Prefork:
    """Track templates by generation, and the workers they fork."""

    def __init__(self, templates: TemplateAPI | None, procs: ProcessAPI, bus: ev.Bus,
                 next_number: Callable[[], int] = lambda: 0) -> None:
        self.templates = templates
        self.next_number = next_number   # the number the next generation will get
        self.procs = procs
        self.bus = bus
        self.live: dict[int, int] = {}                 # generation number -> template pid
        self.owner: OrderedDict[int, Generation] = OrderedDict()   # template pid -> generation
        self.urls: dict[tuple[int, int], str | None] = {}          # pending (generation, slot) -> ready url
        self.unknown: OrderedDict[int, Exit] = OrderedDict()
        self.stopped: set[int] = set()
        # A template's STATUS= (why it could not load the app), for its exit's reason.
        self.last_words: dict[int, str] = {}
        self.starts: dict[int, tuple[Launch, dict[str, str]]] = {}   # generation -> its template's start
        self.standby: int | None = None
        self.standby_key: tuple[object, ...] = ()
        self.standby_for = 0              # the generation the standby was started for
        self.spares: set[int] = set()     # standby pids not (yet) adopted, live or being stopped
        self.standby_deaths = 0
        self.forked_at: dict[int, float] = {}   # generation -> when its template had forked every slot
        self.waiting: dict[int, float] = {}   # template pid with queued requests -> when it last took one
        self.kept: set[int] = set()   # templates kept for a rollback (core/previous.py): not in `live`

    def request(self, gen: Generation, slot: int, launch: Launch) -> None:
        """Ask `gen`'s template (started now if this is its first worker) for `slot`."""
        if self.templates is None:
            raise SpawnError("prefork templates are not available on this system")
        pid = self.live.get(gen.number)
        if pid is None:
            if gen.state is not GenerationState.STARTING or gen.number in self._had_template():
                raise SpawnError("the generation's template is gone; send HUP to start a fresh generation")
            env = {k: v for k, v in launch.env.items() if not k.startswith("LISTEN_")}
            env[contract.GENERATION] = contract.template_generation(gen.number, _relabel(gen.config))
            pid = self._adopt_standby(gen, env)
            if pid is None:
                pid = self.templates.start(launch.argv, env, launch.cwd, launch.user, launch.group)
            self.live[gen.number] = pid
            self.starts[gen.number] = (launch, env)
            self._remember(pid, gen)
            warm = pid in self.spares
            self.bus.emit(ev.TemplateStarted(gen.number, pid, "warm" if warm else "cold"))
            self.spares.discard(pid)
        self.templates.fork(pid, slot, launch.env, launch.fds)
        self.urls[(gen.number, slot)] = launch.ready_url

    def keep(self, number: int) -> None:
        """Keep generation `number`'s template past its generation (neither stopped nor forked from)."""
        self.kept.add(self.live.pop(number))

    def unkeep(self, pid: int, stop: bool) -> None:
        """Stop keeping template `pid` (and stop it: released; or not: lent to a rollback)."""
        self.kept.discard(pid)
        if stop and self.templates is not None:
            self.stopped.add(pid)
            self.templates.stop(pid)

    def lend(self, pid: int, gen: Generation) -> None:
        """Make the kept template `pid` the template of the rollback generation `gen`."""
        self.unkeep(pid, stop=False)
        self.live[gen.number] = pid
        self._remember(pid, gen)

    def _adopt_standby(self, gen: Generation, env: dict[str, str]) -> int | None:
        """Hand the standby `gen`'s app if it was started for the same user, cwd and env."""
        pid, self.standby = self.standby, None
        if pid is None or self.templates is None:
            return None
        if self.standby_key != standby_key(gen.config) or self.standby_for != gen.number:
            self.templates.stop(pid)
            return None
        try:
            self.templates.load(pid, str(gen.config.workers.app), env)
        except SpawnError as e:
            log.warning("standby pid %d unusable (%s); starting a fresh template", pid, e)
            self.templates.stop(pid)
            return None
        return pid

    def _newest_warm(self, gens: list[Generation]) -> Generation | None:
        """Return the newest STARTING or ACTIVE generation if it is a warm prefork one."""
        serving = [g for g in gens if g.state in SERVING]
        if serving and serving[-1].config.prefork and serving[-1].config.workers.warm:
            return serving[-1]
        return None

    def _keep_standby(self, gens: list[Generation], now: float) -> None:
        """Keep one standby for the generation after the newest warm prefork one, started
        once the newest one's template has forked its workers: while it is still STARTING,
        so that a quick series of reloads finds every standby warm."""
        basis = self._newest_warm(gens)
        if self.standby is not None and (basis is None or self.standby_key != standby_key(basis.config)):
            self._stop_standby()
        if basis is None or basis.number not in self.starts or self.standby is not None or self.templates is None:
            return
        if basis.number not in self.forked_at:
            if basis.state is GenerationState.ACTIVE and basis.active_at is not None:
                self.forked_at[basis.number] = basis.active_at
            elif basis.workers and all(w.pid is not None for w in basis.workers.values()):
                self.forked_at[basis.number] = now
            else:
                return
        if now < self.forked_at[basis.number] + STANDBY_DELAY:
            return
        if self.standby_deaths >= STANDBY_DEATHS:
            return
        launch, env = self.starts[basis.number]
        # The environment a process was exec'd with is what /proc/PID/environ shows for
        # good, also in the workers it forks: hand-off peers read their generation there
        # (worker/peers.py), so the standby is exec'd as the generation it will serve.
        number = self.next_number()
        env = {**env, contract.GENERATION: contract.template_generation(number, _relabel(basis.config))}
        try:
            pid = self.templates.start((*launch.argv[:-1], standby_arg(basis.config)), env, launch.cwd,
                                       launch.user, launch.group)
        except SpawnError as e:
            self.standby_deaths += 1
            log.warning("cannot start a standby template: %s", e)
            return
        self.standby, self.standby_key, self.standby_for = pid, standby_key(basis.config), number
        self.spares.add(pid)

    def deadlines(self, gens: list[Generation]) -> list[float]:
        """Return when a standby is due to start and when a stalled template is given up."""
        stalls = [since + STALL for since in self.waiting.values()]
        if self.standby is not None or self.standby_deaths >= STANDBY_DEATHS:
            return stalls
        basis = self._newest_warm(gens)
        if basis is None or basis.number not in self.forked_at:
            return stalls
        return [*stalls, self.forked_at[basis.number] + STANDBY_DELAY]

    def _stop_standby(self) -> None:
        if self.standby is not None and self.templates is not None:
            self.templates.stop(self.standby)
        self.standby = None

    def _had_template(self) -> set[int]:
        return {g.number for g in self.owner.values()}

    def _remember(self, pid: int, gen: Generation) -> None:
        self.owner[pid] = gen
        while len(self.owner) > REMEMBERED:
            old, _ = self.owner.popitem(last=False)
            self.stopped.discard(old)
            self.last_words.pop(old, None)

    def on_notify(self, messages: list[tuple[int, bytes]], now: float) -> list[tuple[int, bytes]]:
        """Apply the templates' SPAWNED messages; return every other message."""
        rest = []
        for pid, data in messages:
            gen = self.owner.get(pid)
            if gen is None:
                rest.append((pid, data))
                continue
            fields = parse_fields(data)
            if fields.get(STATUS):
                self.last_words[pid] = _printable(fields[STATUS])
            spawned = fields.get(SPAWNED)
            if spawned is not None:
                self._spawned(gen, spawned, now)
        return rest

    def _spawned(self, gen: Generation, value: str, now: float) -> None:
        slot_s, _, pid_s = value.partition(":")
        if not (slot_s.isdigit() and pid_s.isdigit()) or int(pid_s) <= 1:
            log.warning("generation %d: template sent a malformed SPAWNED=%.40r; ignored", gen.number, value)
            return
        slot, pid = int(slot_s), int(pid_s)
        # The template runs the app's code: a pid it names is signalled later, so
        # it must be a child of ours (forked workers are re-parented before SPAWNED).
        if pid not in self.unknown and (self.templates is None or not self.templates.is_child(pid)):
            log.warning("generation %d: template named pid %d, which is not a child of the master; ignored",
                        gen.number, pid)
            return
        url = self.urls.pop((gen.number, slot), None)
        if not gen.on_spawned(slot, pid, now):
            log.warning("generation %d slot %d: pid %d forked but not wanted (generation %s); draining it",
                        gen.number, slot, pid, gen.state.name)
            if self.unknown.pop(pid, None) is None:   # an exited pid may be someone else's by now
                self.procs.kill(pid, gen.config.drain_signal)
            return
        log.debug("generation %d slot %d: forked pid %d", gen.number, slot, pid)
        gen.ready_rule.started(pid, url, now)
        early = self.unknown.pop(pid, None)
        if early is not None:
            gen.on_exit(pid, early, now)

    def on_exits(self, exits: list[Exit], generations: Iterable[Generation], now: float) -> list[Exit]:
        """Stop unneeded templates; handle templates' exits; return the other exits."""
        gens = list(generations)
        self._sweep(gens)
        self._feed(now)
        out = []
        self._keep_standby(gens, now)
        for ex in exits:
            if ex.pid in self.spares:
                self._standby_exited(ex)
                continue
            if ex.pid in self.owner:
                self._template_exited(ex, now)
                continue
            if not any(g.has(ex.pid) for g in gens):
                self.unknown[ex.pid] = ex
                while len(self.unknown) > UNKNOWN_EXITS:
                    self.unknown.popitem(last=False)
            out.append(ex)
        return out

    def _feed(self, now: float) -> None:
        """Send the templates the requests they can take; give up on one that stopped reading."""
        if self.templates is None:
            return
        queued = self.templates.flush()
        self.waiting = {pid: now if taken or pid not in self.waiting else self.waiting[pid]
                        for pid, taken in queued.items()}
        for pid, since in list(self.waiting.items()):
            if now >= since + STALL and pid in self.owner and pid not in self.stopped:
                del self.waiting[pid]
                self._give_up(pid, f"template pid {pid} took no request for {STALL:g}s (queue full)", now)

    def _standby_exited(self, ex: Exit) -> None:
        self.spares.discard(ex.pid)
        if ex.pid == self.standby:
            self.standby = None
            self.standby_deaths += 1
            log.warning("standby template pid %d %s%s", ex.pid, ex.describe(),
                        "; no more standbys" if self.standby_deaths >= STANDBY_DEATHS else "")

    def _sweep(self, gens: list[Generation]) -> None:
        serving = {g.number for g in gens if g.state in SERVING}
        for number, pid in list(self.live.items()):
            if number not in serving and self.templates is not None:
                del self.live[number]
                self.stopped.add(pid)
                self.templates.stop(pid)
                log.info("generation %d: template pid %d stopped", number, pid)
        for number in [n for n in self.starts if n not in serving]:
            del self.starts[number]
        for number in [n for n in self.forked_at if n not in serving]:
            del self.forked_at[number]

    def _template_exited(self, ex: Exit, now: float) -> None:
        if ex.pid in self.kept:
            self.kept.discard(ex.pid)
            log.warning("the kept template pid %d %s: `upgraderd rollback` has nothing to roll back to",
                        ex.pid, ex.describe())
        elif ex.pid not in self.stopped:
            self._give_up(ex.pid, f"template pid {ex.pid} {ex.describe()}", now)

    def _give_up(self, pid: int, why: str, now: float) -> None:
        """Stop template `pid` (dead or stalled): fail its STARTING generation, or log for an ACTIVE one."""
        gen = self.owner[pid]
        self.live.pop(gen.number, None)
        if self.templates is not None:
            self.templates.stop(pid)   # release its channel (and SIGKILL it if it still runs)
        self.stopped.add(pid)
        if pid in self.last_words:   # e.g. cannot load 'mod:app': AttributeError: ...
            why += f": {self.last_words.pop(pid)}"
        if gen.state is GenerationState.STARTING:
            gen.fail_start(now, why)
        elif gen.state is GenerationState.ACTIVE:
            log.error("generation %d: %s; its slots can no longer be respawned", gen.number, why)
