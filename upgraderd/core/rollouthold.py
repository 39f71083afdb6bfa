"""`rollback: manual`: a failing check holds the rollout for the operator instead of rolling back.

With `rollout.rollback: manual` the first check that fails does not drain the
canary: the rollout *holds*. Both generations keep serving as during the
window (the canary its share of new connections, the previous generation
the rest, neither signalled), the checks stop (they have spoken, and a
failure they keep reporting must not decide for the operator), and the
window no longer ends by itself. Only the operator decides:
`upgraderd promote` grows the canary to workers.count as after a passed
window, `upgraderd rollback` drains it (counted as rolled back, naming the
check that failed).

Invariants:
- A held rollout has no deadline of its own (the loop must not spin on a
  window that ended), and it is counted once in rollout_check_failures, at
  the hold.
- The `ready` check of a promotion is not held: workers that could not start
  leave nothing to promote, so it rolls back as with `auto`.
"""

from __future__ import annotations

import logging
from typing import Callable

from upgraderd.core import events as ev
from upgraderd.core import rolloutchecks as checksmod
from upgraderd.core.generation import Generation

log = logging.getLogger("upgraderd")

MANUAL = "manual"
ASK = "`upgraderd promote` or `upgraderd rollback`"


def holds(gen: Generation, check: str) -> bool:
    """Return True if the failure of `check` holds `gen`'s rollout rather than rolling it back."""
    return gen.config.rollout.rollback == MANUAL and check != "ready"


def hold(gen: Generation, previous: int, checks: list[checksmod.Check], check: str, why: str, bus: ev.Bus,
         tell_systemd: Callable[[str], None]) -> str:
    """Hold `gen`'s rollout after `check` failed with `why`; return what the hold reports."""
    for c in checks:
        c.stop()
    checks.clear()
    held = f"check {check} failed: {why}"
    bus.emit(ev.RolloutCheckFailed(check))
    log.error("rollout: generation %d %s; holding it for the operator (rollback: manual): the canary keeps "
              "its share beside generation %d until %s", gen.number, held, previous, ASK)
    tell_systemd(f"STATUS=generation {gen.number} canary held: check {check} failed; waiting for {ASK}")
    return held
