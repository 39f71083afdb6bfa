"""The previous release: its template, kept after a reload for an instant rollback.

With `rollout.keep_previous: T` (prefork apps), the template of a generation
that a successor supersedes (a reload's, or a canary's promotion) is not
stopped: it is *kept* for T, with the config it was started from. It has the
previous release's code imported, so `upgraderd rollback` forks a new
generation from it: no exec, no import. That generation is like any other
(the next number, gated on readiness, its predecessor drained and handed
off); it only runs an older release, the one of the generation named by
`Generation.runs`.

Design note: after a rollback the superseded generation's template (the newer
release's) becomes the kept one in its turn, so a second `upgraderd rollback`
returns to the newer release; the choice costs nothing more (one kept
template at a time, as before), and an operator who rolled back by mistake
gets the newer release back as fast. A HUP builds a fresh template from disk
as always, and the one it supersedes is kept instead.

Invariants:
- At most one kept template; keeping another releases the first (log line).
- A kept template serves no generation: the fleet's prefork part
  (core/prefork.py) neither stops it nor forks from it until it is lent to a
  rollback generation (`take`), and it is stopped at its deadline, when the
  master stops, or when it dies (then `upgraderd rollback` has nothing to fork).
- What it costs: one idle interpreter with the app imported; its pages are
  shared with the workers forked from it while any live, so its PSS is what
  the rollback keeps alive (bench/rollback.py measures it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from upgraderd.config.schema import Config
from upgraderd.core.generation import Generation
from upgraderd.core.prefork import Prefork

log = logging.getLogger("upgraderd")


@dataclass(frozen=True)
class Kept:
    """A kept template: whose release it runs, with which config, until when."""

    release: int        # the generation whose code the template imported
    superseded: int     # the generation it last served (== release unless it served a rollback)
    config: Config
    template: int       # its pid
    until: float


class Previous:
    """The kept template of the previous release, and when it is released."""

    def __init__(self, prefork: Prefork) -> None:
        self.prefork = prefork
        self.kept: Kept | None = None

    def keep(self, old: Generation, successor: Generation, now: float) -> None:
        """Keep `old`'s template, which `successor` just superseded, if its config asks to."""
        ttl = successor.config.rollout.keep_previous
        pid = self.prefork.live.get(old.number)
        if ttl <= 0 or pid is None or not old.config.prefork or old.active_at is None:
            return
        self.release("another release's template is kept now")
        self.prefork.keep(old.number)
        self.kept = Kept(old.runs or old.number, old.number, old.config, pid, now + ttl)
        log.info("keeping the template of generation %d's release (pid %d, served by generation %d) for "
                 "%gs: `upgraderd rollback` forks it", self.kept.release, pid, old.number, ttl)

    def take(self) -> Kept | None:
        """Return the kept template for a rollback, and stop keeping it (None: none is kept)."""
        kept = self.live()
        self.kept = None
        return kept

    def live(self) -> Kept | None:
        """Return the kept template, if it is still alive."""
        if self.kept is not None and self.kept.template not in self.prefork.kept:
            self.kept = None   # it died: prefork logged how
        return self.kept

    def expire(self, now: float) -> None:
        """Release the kept template once its time is up."""
        kept = self.live()
        if kept is not None and now >= kept.until:
            self.release(f"rollout.keep_previous ({kept.config.rollout.keep_previous:g}s) is over")

    def release(self, why: str) -> None:
        """Stop the kept template, if any, saying why."""
        kept = self.live()
        self.kept = None
        if kept is not None:
            self.prefork.unkeep(kept.template, stop=True)
            log.info("released the template of generation %d's release (pid %d): %s; `upgraderd rollback` "
                     "has nothing to roll back to now", kept.release, kept.template, why)

    def deadline(self) -> float | None:
        """Return when the kept template is due to be released."""
        kept = self.live()
        return kept.until if kept is not None else None
