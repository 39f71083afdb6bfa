"""Batches: the new generation replaces the serving one `batches.size` workers at a time.

With `rollout.strategy: batches` a reload that has a serving generation to fall
back on starts the new generation with `size` workers, held beside the old
one as a canary is (core/fleet.py `held`, core/rollout.py), and then:

    batch k STARTING ──its workers READY──▶ PAUSING (the checks watch it for `pause`)
        │ not READY within ready.timeout            │ every check passed, the pause is over
        ▼                                            ▼
      check `ready` fails          last batch? ──yes──▶ PROMOTED: released; the old generation's
                                        │ no              remaining workers drain (core/fleet.py)
                                        ▼
                         DRAINING: `size` old workers drain (the slots the batch took over,
                         else the highest); once they have exited ──▶ batch k+1 STARTING

Invariants:
- How the peak is counted: every live process of both generations, the old
  generation's draining workers included until they are reaped. A batch
  starts only once the old workers the previous batch drained have exited (or
  were SIGKILLed at drain.timeout), so at most max(old count, workers.count)
  + size workers are alive at any moment of the roll forward; a drain that
  holds connections for drain.timeout delays the next batch by as much.
- The old generation keeps at least one worker that is not draining until the
  promotion: it is the serving generation (`Fleet.active`) until then.
- A failing check rolls back: the new generation drains at once and the old
  one gets back every slot the roll took from it (respawned in place, so each
  reuseport slot socket stays wanted and is never closed). A check that fails
  while this batch's old workers are still draining is acted on once they
  have exited: a slot is respawned only when its old worker is gone (a slot
  holds one worker record). The roll back is all at once, not in batches: a
  failing release leaves at once, at the cost of up to count + the retired
  slots + size live workers while the new ones drain.

Nothing here makes a syscall: the generations start and signal workers
through their launcher, time is the `now` argument, and the seams are the
rollout's (core/rollout.py `RolloutSeams`).
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

from upgraderd.config.schema import Config
from upgraderd.core.generation import Generation, WorkerState

log = logging.getLogger("upgraderd")

PROMOTE = "promote"   # `step`'s verdict when the last batch passed
Verdict = str | tuple[str, str] | None   # None: going on; PROMOTE; (check, why): roll back


class Stage(enum.Enum):
    STARTING = "starting"
    PAUSING = "pausing"
    DRAINING = "draining"


def first_size(cfg: Config) -> int:
    """Return how many workers the first batch of a reload to `cfg` starts."""
    return min(cfg.rollout.batches.size, cfg.workers.count)


@dataclass
class Batches:
    """The batches of one rollout: which is under way, and what the roll took from the old generation."""

    size: int
    pause: float
    total: int
    ready_timeout: float
    started_at: float
    ensure: Callable[[Config], object]       # bind a config's slot sockets (new slots may need theirs)
    tell_systemd: Callable[[str], None]
    number: int = 1
    stage: Stage = Stage.STARTING
    pause_ends: float = 0.0
    slots: list[int] = field(default_factory=list)     # the new generation's slots of this batch
    drained: list[int] = field(default_factory=list)   # pids of the old workers this batch drained
    retired: list[int] = field(default_factory=list)   # the old generation's slots taken so far
    failed: tuple[str, str] | None = None               # a failure waiting for the drained to exit

    @classmethod
    def first(cls, gen: Generation, now: float, ensure: Callable[[Config], object],
              tell_systemd: Callable[[str], None]) -> Batches:
        """Return the batches of `gen`, whose first batch (all its workers so far) is READY."""
        spec = gen.config.rollout.batches
        total = math.ceil(gen.config.workers.count / first_size(gen.config))
        b = cls(first_size(gen.config), spec.pause, total, gen.config.ready.timeout, now, ensure, tell_systemd,
                slots=sorted(gen.workers))
        b._announce(gen)
        return b

    def step(self, gen: Generation, old: Generation | None, failed: tuple[str, str] | None,
             passed: bool, now: float) -> Verdict:
        """Advance the roll of the held, ACTIVE `gen` over `old` (the serving generation);
        `failed` is a check's failure this pass, `passed` whether every check has nothing left to prove."""
        self.failed = self.failed or failed
        if self.failed is not None:
            return None if self.draining(old) else self.failed
        if self.stage is Stage.STARTING:
            late = [s for s in self.slots if s in gen.workers and gen.workers[s].state is not WorkerState.READY]
            if late:
                if now < self.started_at + self.ready_timeout:
                    return None
                return ("ready", f"slot(s) {', '.join(map(str, late))} of batch {self.number} of {self.total} "
                                 f"not ready within {self.ready_timeout:g}s")
            self.stage, self.pause_ends = Stage.PAUSING, now + self.pause
        if self.stage is Stage.PAUSING:
            if now < self.pause_ends or not passed:
                return None
            if len(gen.workers) >= gen.config.workers.count:
                return PROMOTE
            self._drain_old(gen, old, now)
        if self.stage is Stage.DRAINING and not self.draining(old):
            self._next(gen, now)
        return None

    def draining(self, old: Generation | None) -> bool:
        """Return True while an old worker this batch drained is alive."""
        return old is not None and any(old.has(pid) for pid in self.drained)

    def end_pauses(self, now: float) -> None:
        """End the pause under way and skip the later ones (`upgraderd promote`); the checks still run."""
        self.pause, self.pause_ends = 0.0, min(self.pause_ends, now)

    def regrow(self, old: Generation | None, now: float) -> list[int]:
        """Give `old` back every slot the roll took (the rollback); return the slots respawned."""
        if old is None:
            return []
        self.ensure(old.config)
        back = [old.add_slot(now, slot) for slot in sorted(self.retired) if slot not in old.workers]
        self.retired = [s for s in self.retired if s not in back]
        return back

    def deadline(self) -> float | None:
        """Return when `step` next has something to do by time alone."""
        if self.failed is not None:
            return None
        if self.stage is Stage.STARTING:
            return self.started_at + self.ready_timeout
        return self.pause_ends if self.stage is Stage.PAUSING else None

    def _drain_old(self, gen: Generation, old: Generation | None, now: float) -> None:
        self.stage, self.drained = Stage.DRAINING, []
        if old is None:
            return
        serving = [s for s, w in old.workers.items() if not w.retiring]
        # The slots this batch took over first (their sockets keep a READY worker), then the highest.
        order = [s for s in self.slots if s in serving] + sorted(set(serving) - set(self.slots), reverse=True)
        taken = []
        for slot in order[:min(len(self.slots), len(serving) - 1)]:
            pid = old.workers[slot].pid
            if old.remove_slot(now, slot) is None:
                continue
            taken.append(slot)
            if pid is not None and old.has(pid):
                self.drained.append(pid)
        self.retired += taken
        log.info("rollout: generation %d batch %d of %d passed; generation %d drains slot(s) %s",
                 gen.number, self.number, self.total, old.number, ", ".join(map(str, taken)) or "none")

    def _next(self, gen: Generation, now: float) -> None:
        self.ensure(gen.config)
        n = min(self.size, gen.config.workers.count - len(gen.workers))
        self.slots = [gen.add_slot(now) for _ in range(n)]
        self.number, self.stage, self.started_at = self.number + 1, Stage.STARTING, now
        self._announce(gen)

    def _announce(self, gen: Generation) -> None:
        log.info("rollout: generation %d batch %d of %d: slot(s) %s starting, %d of %d workers",
                 gen.number, self.number, self.total, ", ".join(map(str, self.slots)), len(gen.workers),
                 gen.config.workers.count)
        self.tell_systemd(f"STATUS=generation {gen.number} batch {self.number} of {self.total}: "
                          f"{len(gen.workers)} of {gen.config.workers.count} workers")
