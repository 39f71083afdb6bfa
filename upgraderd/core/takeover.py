"""Decide when a dead master's orphaned workers, taken over at start, drain and die.

The orphans kept accepting on the sockets this master now shares with them
(system/orphanfds.py found them and took the sockets). They must go only once
something else accepts: so they get their drain signal when this master's
first generation is ACTIVE (or when this master stops, so they do not outlive
it by their whole grace period). Like a draining generation they get
`drain.timeout` to finish, then SIGKILL. They are not our children: we
cannot reap them, and the OrphanAPI seam tracks them by pidfd.
"""

from __future__ import annotations

import logging
from upgraderd.core import events as ev
from upgraderd.core.seams import OrphanAPI

log = logging.getLogger("upgraderd")

DEFAULT_TIMEOUT = 30.0


class Takeover:
    """The orphans one master took over, and how far their drain has come."""

    def __init__(self, orphans: OrphanAPI, bus: ev.Bus) -> None:
        self.orphans, self.bus = orphans, bus
        self.drained_at: float | None = None
        self.deadline: float | None = None
        self.count = 0
        self.killed = False
        self.done = False

    def settle(self, now: float, serving: bool, drain_timeout: float | None) -> None:
        """Drain the orphans once a generation of ours serves (or we stop); SIGKILL them at the deadline.

        `serving`: a generation is ACTIVE or the master stops; `drain_timeout`:
        the serving config's `drain.timeout`, if there is one.
        """
        if self.done:
            return
        if self.drained_at is None:
            if not serving:
                return
            pids = self.orphans.pids()
            self.count = len(pids)
            if pids:
                self.bus.emit(ev.OrphansTakenOver(len(pids), tuple(pids)))
            self.orphans.drain()
            timeout = drain_timeout if drain_timeout is not None else DEFAULT_TIMEOUT
            self.drained_at, self.deadline = now, now + timeout
        if self.orphans.live() == 0:
            if self.count:
                log.info("the orphaned workers have exited")
            self.orphans.close()
            self.done = True
        elif not self.killed and self.deadline is not None and now >= self.deadline:
            log.warning("orphaned workers still running at their drain deadline: SIGKILL %s",
                        " ".join(map(str, self.orphans.pids())))
            self.orphans.kill()
            self.killed = True
