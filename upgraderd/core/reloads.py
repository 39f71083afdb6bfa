"""The reloads: the owner of queued HUPs, the reload under way, its outcome and the config in service.

A reload is asked for by SIGHUP, `upgraderd reload` (which sends one) or a
watched file (core/watching.py); it loads the config through the seam, binds
what it needs, runs the checks it is built with (core/slots.py's, the
metrics'), and has the fleet start a generation. Once that generation settles
its outcome is reported to the bus (`ReloadSettled`): counters, the status
file and `upgraderd reload` see it there. With `rollout.strategy: canary` the
generation starts as a canary held beside the serving one, and the reload
settles only at the rollout's verdict (core/rollout.py, which the reloads own).

Invariants:
- At most one reload is under way (its generation is STARTING, or a canary
  without a verdict); HUPs (and file changes) that arrive meanwhile coalesce
  into one queued reload.
- A settled reload records which HUPs it covers: `upgraderd reload` sends a
  HUP, then waits until a settled reload covers it (see service/status.py).
- Every outcome is reported exactly once: success, failed (the generation did
  not become ACTIVE) or rejected (nothing was started). A failed or rejected
  reload leaves the serving generation and its sockets untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from upgraderd import __version__
from upgraderd.config import plan
from upgraderd.config.schema import Config
from upgraderd.core import events as ev
from upgraderd.core.fleet import Fleet
from upgraderd.core.generation import Generation, GenerationState
from upgraderd.core.requestcounts import RequestReader
from upgraderd.core.rollout import Progress, Rollouts, RolloutSeams
from upgraderd.core.seams import Exit, ProbeAPI, ProcessAPI, WatcherAPI
from upgraderd.core.watching import FileWatch
from upgraderd.errors import ConfigError, ExitCode

log = logging.getLogger("upgraderd")
VERSION = __version__


@dataclass(frozen=True)
class ReloadSeams:
    """What a reload needs of the OS."""

    config_path: str
    load_config: Callable[[str], Config]
    # Bind what a config needs and is not bound yet; raise OSError naming the address.
    ensure_listeners: Callable[[Config], object]
    tell_systemd: Callable[[str], None]
    wall: Callable[[], float]
    watcher: WatcherAPI | None = None
    # For the rollouts' checks (core/rollout.py): the command's process, the http probes.
    procs: ProcessAPI | None = None
    check_probes: ProbeAPI | None = None
    environ: Mapping[str, str] = field(default_factory=dict)
    # Read and remove the operator's rollout request (`upgraderd promote|rollback`); "" if none.
    requests: Callable[[], str] = lambda: ""
    # The workers' request counts, for the rollouts' traffic checks (None: not available).
    read_requests: RequestReader | None = None


class Reloads:
    """The reload under way, the one queued behind it, their outcomes, and the config in service."""

    def __init__(self, seams: ReloadSeams, fleet: Fleet, bus: ev.Bus,
                 kernel_check: Callable[[Config], None],
                 reload_checks: Sequence[Callable[[Config], None]] = ()) -> None:
        self.seams, self.fleet, self.bus = seams, fleet, bus
        self.rollouts = None if seams.procs is None else Rollouts(   # None: every reload is all-at-once
            RolloutSeams(seams.procs, seams.check_probes, seams.environ, seams.ensure_listeners,
                         seams.tell_systemd, seams.read_requests), fleet, bus)
        self.kernel_check = kernel_check       # at start and at every reload
        self.reload_checks = reload_checks     # at every reload, before the kernel check
        self.config: Config | None = None      # the config of the serving generation
        self.exit_code = ExitCode.OK
        self.pending_since: float | None = None
        self.watching: Generation | None = None
        self.since = 0.0
        self.hups = 0                          # seen so far (carried over a USR2 re-exec)
        self.covers = 0
        self.files = FileWatch(seams.watcher, seams.config_path, seams.load_config, bus, self.queue)
        # Outcomes settled in this pass, said (logged, told to systemd, the pidfile written) only
        # once the pass's snapshot is published: whoever reads "serving" or "reload done" and
        # then asks /readyz, the status file or the metrics finds what the line says.
        self._unsaid: list[Callable[[], None]] = []
        # Set when outcomes were said: the pass after it comes at once (what `busy` held back:
        # a queued reload, a USR2's exec) and clears it in settle().
        self._said = False

    def _say(self, level: int, line: str, systemd: str, event: ev.Event | None = None) -> None:
        def say() -> None:
            log.log(level, "%s", line)
            self.seams.tell_systemd(systemd)
            if event is not None:
                self.bus.emit(event)
        self._unsaid.append(say)

    def announce(self) -> None:
        """Say the outcomes settled this pass; the master calls it after publishing the pass's snapshot."""
        self._said = self._said or bool(self._unsaid)
        while self._unsaid:   # one that raises leaves the rest for the next pass, in order
            self._unsaid.pop(0)()

    def first(self, cfg: Config, now: float) -> None:
        """Start generation 1 from `cfg` (already bound)."""
        log.info("upgraderd %s starting: %s", VERSION, plan_line(None, cfg))
        self.kernel_check(cfg)
        self.config = cfg
        self.watching, self.since = self.fleet.start_generation(cfg, now), now

    def adopt(self, config: Config | None, hups: int, now: float) -> None:
        """Carry on after a USR2 re-exec: the serving config, the HUP count, and one reload queued."""
        self.config, self.hups = config, hups
        self.queue(now)

    def hup(self, now: float) -> None:
        """Take a SIGHUP: queue a reload (HUPs coalesce), unless the master stops."""
        self.hups += 1
        self.bus.emit(ev.HupReceived())
        if self.fleet.stopping:
            log.info("received SIGHUP while stopping: ignored")
            return
        self.queue(now)
        starting = self.fleet.starting
        canary = self.fleet.held
        if canary is not None and starting is None:
            log.info("received SIGHUP: reload queued, the rollout of generation %d has no verdict yet",
                     canary.number)
        elif starting is not None:
            log.info("received SIGHUP: reload queued, generation %d is still starting", starting.number)
        else:
            log.info("received SIGHUP: reloading %s", self.seams.config_path)

    def ask(self, now: float) -> None:
        """Take SIGWINCH: the operator's `upgraderd promote` or `rollback` of the rollout under way."""
        request = self.seams.requests()
        if request.startswith("previous"):
            self.roll_back(now)
            return
        if self.rollouts is None or not request:
            log.warning("received SIGWINCH without a rollout request (see `upgraderd promote`): ignored")
            return
        self.rollouts.ask(request)

    def roll_back(self, now: float) -> None:
        """Take `upgraderd rollback` with no rollout under way: fork the previous release's kept
        template into a new generation (core/previous.py); it settles as a reload does."""
        kept = self.fleet.previous.live()
        why = ("a reload or the stop is under way; try again once it settles" if self.busy or self.fleet.stopping
               else "no previous release is kept (rollout.keep_previous)" if kept is None else "")
        if kept is not None and not why:
            try:
                self.seams.ensure_listeners(kept.config)
            except OSError as e:
                why = f"cannot bind the previous release's listeners: {e.strerror or e}"
        self.covers = self.hups
        if why or kept is None:
            self.reject(f"upgraderd rollback: {why}", "rejected")
            return
        self.fleet.previous.take()
        log.info("upgraderd rollback: forking generation %d's release from its kept template (pid %d)",
                 kept.release, kept.template)
        self.watching, self.since = self.fleet.start_generation(kept.config, now, kept=kept), now

    def queue(self, now: float) -> None:
        """Queue a reload; `now` is kept as the oldest unserved request."""
        if self.pending_since is None:
            self.pending_since = now

    def queued(self) -> str:
        """Return a log suffix saying whether another reload is queued."""
        return "; another reload is queued" if self.pending_since is not None else ""

    def run_queued(self, now: float) -> None:
        """Run the queued reload, if any, and record its outcome if it settled at once."""
        since, self.pending_since = self.pending_since, None
        if since is not None:
            self.reload(now, since)
            self.settle(now)

    def reload(self, now: float, since: float) -> None:
        """Re-read the config and start a new generation; on any error keep serving."""
        self.seams.tell_systemd(f"RELOADING=1\nMONOTONIC_USEC={int(now * 1e6)}")
        self.covers = self.hups   # it covers every HUP and file change seen so far
        self.files.rebase()
        try:
            cfg = self.seams.load_config(self.seams.config_path)
            self.seams.ensure_listeners(cfg)
            log.info("reload: %s", plan_line(self.config, cfg))
            for check in self.reload_checks:
                check(cfg)
            self.kernel_check(cfg)
            canary = self.rollouts.canary_size(cfg) if self.rollouts is not None else None
            self.watching, self.since = self.fleet.start_generation(cfg, now, canary), since
        except ConfigError as e:
            self.reject(str(e), "rejected")
        except OSError as e:
            self.reject(e.strerror or str(e), "rejected")
        except Exception as e:  # a bug: never let it take the serving generation down
            self.bus.emit(ev.InternalError("reloading"))
            log.exception("internal error while reloading")
            self.reject(f"internal error: {e!r}", "rejected")

    @property
    def busy(self) -> bool:
        """Return True while a reload (or the start) awaits its outcome, or its outcome is not said
        yet: a queued reload or a USR2 waits (its RELOADING=1 must follow the last READY=1)."""
        return self.watching is not None or bool(self._unsaid)

    def reject(self, why: str, result: str, generation: int = 0, status: str = "reload failed") -> None:
        """Report a rejected or failed reload and log it; the serving generation is untouched."""
        self.bus.emit(ev.ReloadSettled(result, generation, self.covers, why, at=self.seams.wall()))
        active = self.fleet.active
        line = (f"reload failed, still serving generation {active.number if active else '-'}{self.queued()}: "
                f"{one_line(why)}")
        self._say(logging.ERROR, line, f"READY=1\nSTATUS={status}")

    def settle(self, now: float) -> None:
        """Record the outcome of the reload (or start) under way once its generation has settled."""
        self._said = False
        gen = self.watching
        if gen is None or gen.state is GenerationState.STARTING:
            return
        verdict = self._judge(gen, now)
        if verdict is None:
            return
        self.watching = None
        if verdict:
            self.reject(f"generation {gen.number} {verdict}", "failed", gen.number,
                        status=f"generation {gen.number} {one_line(verdict)}")
            return
        if self.fleet.stopping and gen.state is not GenerationState.ACTIVE:
            log.info("generation %d stopped before it became ready: the master is stopping", gen.number)
        elif gen.number == 1:
            self._settle_first(gen, now)
        elif gen.state is GenerationState.ACTIVE:
            self.config = gen.config
            self.files.follow(self.config, now)   # the new config's watch list, from now on
            took = now - self.since
            self.bus.emit(ev.ReloadSettled("success", gen.number, self.covers, took=took, at=self.seams.wall()))
            runs = f" (a rollback: it runs generation {gen.runs}'s release)" if gen.runs else ""
            line = (f"reload done: generation {gen.number} ACTIVE {took:.3f}s after "
                    f"{'`upgraderd rollback`' if gen.runs else 'HUP'}{runs}{self.queued()}")
            self._say(logging.INFO, line, f"READY=1\nSTATUS=generation {gen.number} active{runs}")
        else:
            self.reject(f"generation {gen.number}: {gen.reason}", "failed", gen.number)

    def _judge(self, gen: Generation, now: float) -> str | None:
        """Return None while `gen`'s rollout has no verdict, "" to settle as usual, or why it rolled back."""
        if self.rollouts is None or self.fleet.held is not gen:
            return ""
        if gen.state is not GenerationState.ACTIVE or self.fleet.stopping:
            self.rollouts.end(gen)   # it failed to start, or the master stops: settled as usual
            return ""
        return self.rollouts.judge(gen, now)

    def _settle_first(self, gen: Generation, now: float) -> None:
        if gen.state is GenerationState.ACTIVE:
            line = f"serving: generation 1 ACTIVE {now - gen.created_at:.3f}s after start"
            self._say(logging.INFO, line, "READY=1\nSTATUS=generation 1 active", ev.Serving())
            return
        log.error("the first generation failed (%s); stopping", gen.reason)
        self.bus.emit(ev.StartFailed(gen.reason))
        self.exit_code = ExitCode.FAILED
        self.fleet.stop("failed", now)

    def watch_files(self, now: float) -> None:
        """Follow the serving config's watch list and queue a reload on a real change."""
        self.files.step(self.config, self.fleet.stopping, now)

    def deadlines(self) -> Iterable[float | None]:
        """Return when the file watch, the rollout under way or a pass after outcomes were said needs the loop."""
        return (self.files.deadline, 0.0 if self._said else None,
                *(self.rollouts.deadlines() if self.rollouts is not None else ()))

    def progress(self) -> Progress | None:
        """Return the rollout under way, if any (for the snapshot)."""
        return self.rollouts.progress() if self.rollouts is not None else None

    def claim(self, exits: Iterable[Exit]) -> list[Exit]:
        """Take the rollout check commands' exits out of `exits`; return the rest."""
        return self.rollouts.claim(exits) if self.rollouts is not None else list(exits)


def one_line(text: str) -> str:
    """Return a multi-line message as one log line."""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def plan_line(old: Config | None, new: Config) -> str:
    """Return what applying `new` over `old` changes, as one log line."""
    return one_line(plan.diff(old, new).describe())
