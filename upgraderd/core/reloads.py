"""Track reloads: queued HUPs, which HUPs a reload covers, and its outcome.

Invariants:
- At most one reload is under way (its generation is STARTING); HUPs (and
  file changes, see core/watching.py) that arrive meanwhile coalesce into one
  queued reload.
- A settled reload records which HUPs it covers: `upgraderd reload` sends a
  HUP, then waits until a settled reload covers it (see service/status.py).
- Every outcome is counted exactly once: success, failed (the generation did
  not become ACTIVE) or rejected (nothing was started).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from upgraderd import __version__
from upgraderd.config import plan
from upgraderd.config.schema import Config
from upgraderd.core.generation import Generation, GenerationState
from upgraderd.core.stats import Stats
from upgraderd.core.watching import FileWatch
from upgraderd.errors import ExitCode

if TYPE_CHECKING:
    from upgraderd.core.master import Master

log = logging.getLogger("upgraderd")
VERSION = __version__


@dataclass
class ReloadTracker:
    """The reload under way, the one queued behind it, and their outcomes in `stats`."""

    wall: Callable[[], float]
    stats: Stats = field(default_factory=Stats)
    pending_since: float | None = None
    watching: Generation | None = None
    since: float = 0.0
    covers: int = 0
    # Reloads asked for by a file change (config `reload.watch`), the other source besides HUP.
    files: FileWatch = field(default_factory=FileWatch)

    def hup(self, now: float) -> None:
        """Queue a reload (HUPs coalesce); `now` is kept as the oldest unserved request."""
        if self.pending_since is None:
            self.pending_since = now

    def take(self) -> float | None:
        """Return when the queued reload was asked for, and unqueue it (None: nothing queued)."""
        since, self.pending_since = self.pending_since, None
        return since

    def queued(self) -> str:
        """Return a log suffix saying whether another reload is queued."""
        return "; another reload is queued" if self.pending_since is not None else ""

    def begin(self) -> None:
        """Note that a reload now reads its config: it covers every HUP and file change seen so far."""
        self.covers = self.stats.hups
        self.files.rebase()

    def watch(self, gen: Generation, since: float) -> None:
        """Follow `gen` until it settles; `since` is when the reload was asked for."""
        self.watching, self.since = gen, since

    def settled(self) -> Generation | None:
        """Return the watched generation once it is no longer STARTING, and stop watching it."""
        gen = self.watching
        if gen is None or gen.state is GenerationState.STARTING:
            return None
        self.watching = None
        return gen

    def succeeded(self, gen: Generation, now: float) -> float:
        """Count a successful reload to `gen`; return its duration since the HUP."""
        took = now - self.since
        self._record("success", gen.number)
        self.stats.last_reload_ok = True
        self.stats.last_reload_success_at = self.wall()
        self.stats.reload_durations.observe(took)
        return took

    def failed(self, why: str, result: str, generation: int = 0) -> None:
        """Count a reload that was rejected or whose generation failed."""
        self._record(result, generation)
        self.stats.last_reload_ok = False
        self.stats.last_reload_error = why

    def _record(self, result: str, generation: int) -> None:
        self.stats.reloads[result] += 1
        self.stats.last_reload_result = result
        self.stats.last_reload_generation = generation
        self.stats.last_reload_covers = self.covers


def failed(master: Master, why: str, result: str, generation: int = 0) -> None:
    """Count a rejected or failed reload and log it; the serving generation is untouched."""
    master.reloads.failed(why, result, generation)
    active = master.active
    log.error("reload failed, still serving generation %s%s: %s", active.number if active else "-",
              master.reloads.queued(), one_line(why))
    master.system.tell_systemd("READY=1\nSTATUS=reload failed")


def settle(master: Master, now: float) -> None:
    """Record the outcome of the reload (or start) under way once its generation has settled."""
    gen = master.reloads.settled()
    if gen is None:
        return
    if master.stopping and gen.state is not GenerationState.ACTIVE:
        log.info("generation %d stopped before it became ready: the master is stopping", gen.number)
    elif gen.number == 1:
        _settle_first(master, gen, now)
    elif gen.state is GenerationState.ACTIVE:
        master.config = gen.config
        master.reloads.files.follow(master, now)   # the new config's watch list, from now on
        took = master.reloads.succeeded(gen, now)
        log.info("reload done: generation %d ACTIVE %.3fs after HUP%s", gen.number, took,
                 master.reloads.queued())
        master.system.tell_systemd(f"READY=1\nSTATUS=generation {gen.number} active")
    else:
        failed(master, f"generation {gen.number}: {gen.reason}", "failed", gen.number)


def _settle_first(master: Master, gen: Generation, now: float) -> None:
    if gen.state is GenerationState.ACTIVE:
        log.info("serving: generation 1 ACTIVE %.3fs after start", now - gen.created_at)
        master.system.tell_systemd("READY=1\nSTATUS=generation 1 active")
        master.hooks.on_serving()
        return
    log.error("the first generation failed (%s); stopping", gen.reason)
    master.hooks.on_start_failed(gen.reason)
    master.exit_code = ExitCode.FAILED
    master.stopping_mode = "failed"


def one_line(text: str) -> str:
    """Return a multi-line message as one log line."""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def plan_line(old: Config | None, new: Config) -> str:
    """Return what applying `new` over `old` changes, as one log line."""
    return one_line(plan.diff(old, new).describe())
