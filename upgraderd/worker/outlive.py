"""When a worker's master dies: keep serving for a grace period, then drain.

A master that crashes (or is SIGKILLed) leaves its workers orphaned. If they
drained at once, nothing would accept on the listening sockets until a new
master had bound and started its first generation: clients would be refused
(issue 13: 60-80 per restart under load). So an orphan keeps accepting for
`UPGRADERD_ORPHAN_GRACE` seconds (config `drain.orphan_grace`, 30s by default).

A restarted master of the same pidfile takes the orphans' listening sockets
over (system/orphanfds.py) and sends them the drain signal once its own first
generation is ACTIVE: the grace period is only the upper bound, for the case
where no master comes back.

The parent is checked by its pid: `os.getppid()` changes when the parent
dies and the process is reparented to init or a subreaper.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable

from upgraderd.contract import env

ENV_GRACE = env.ORPHAN_GRACE
DEFAULT_GRACE = 30.0


def grace_from_env(environ: dict[str, str] | None = None) -> float:
    """Return the orphan grace period in seconds from the environment (the default if unset or bad)."""
    raw = (os.environ if environ is None else environ).get(ENV_GRACE, "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_GRACE
    return value if math.isfinite(value) and value >= 0 else DEFAULT_GRACE


class OrphanWatch:
    """Tell a worker's loop when being orphaned means it is time to drain."""

    def __init__(self, grace: float | None = None, clock: Callable[[], float] = time.monotonic,
                 getppid: Callable[[], int] = os.getppid) -> None:
        self.grace = grace_from_env() if grace is None else grace
        self.clock = clock
        self.getppid = getppid
        self.parent = getppid()
        self.orphaned_at: float | None = None

    def should_drain(self) -> bool:
        """Return True once the parent has been gone for the grace period."""
        if self.orphaned_at is None:
            if self.getppid() == self.parent:
                return False
            self.orphaned_at = self.clock()
            print(f"upgraderd worker {os.getpid()}: master (pid {self.parent}) is gone; serving on for "
                  f"up to {self.grace:g}s, until a new master drains us", file=sys.stderr, flush=True)
        return self.clock() - self.orphaned_at >= self.grace
