"""Judge notify datagrams: READY=1 from our own workers counts, the rest is counted and ignored.

Hazard: the notify socket is an abstract Unix socket, so any local user can
send to it. Each ignored datagram is counted, but a flood must not become a
flood of log lines (60,000 datagrams a second once wrote 60 MB of log in
10 s). So warnings are rate-limited: the first ignored datagram of a burst
is logged, later ones are only counted, and one summary line per interval
says how many were ignored since.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

from upgraderd.contract.notify import READY
from upgraderd.core import events as ev
from upgraderd.core.generation import Generation

log = logging.getLogger("upgraderd")

# At most one warning line per this many seconds, however many datagrams arrive.
WARN_INTERVAL = 10.0


def parse_fields(data: bytes) -> dict[str, str]:
    """Parse newline-separated KEY=VALUE lines; raise ValueError on garbage."""
    text = data.decode("utf-8")
    out: dict[str, str] = {}
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            raise ValueError(f"not a KEY=VALUE line: {line[:40]!r}")
        out[key] = value
    if not out:
        raise ValueError("empty message")
    return out


@dataclass
class NotifyJudge:
    """Sort datagrams into READY=1 of a worker and ignored ones, with rate-limited warnings."""

    bus: ev.Bus
    _unreported: int = 0
    _next_warning: float = 0.0

    def ready_pids(self, messages: list[tuple[int, bytes]], owners: Mapping[int, Generation],
                   now: float) -> list[tuple[int, Generation]]:
        """Return the (pid, generation) pairs whose READY=1 counts; count and warn about the rest."""
        out = []
        for pid, data in messages:
            gen = owners.get(pid)
            if gen is None:
                self._ignore(now, f"notify message from pid {pid}: not a worker")
                continue
            try:
                fields = parse_fields(data)
            except ValueError as e:
                self._ignore(now, f"bad notify message from pid {pid}: {e}")
                continue
            if fields.get(READY) == "1" and gen.ready_rule.trusts_notify():
                out.append((pid, gen))
        self.flush(now)
        return out

    def _ignore(self, now: float, why: str) -> None:
        self.bus.emit(ev.NotifyRejected())
        if now >= self._next_warning and self._unreported == 0:
            log.warning("ignored %s (further ones are counted in "
                        "upgraderd_notify_rejected_total, and summarised every %gs)", why, WARN_INTERVAL)
            self._next_warning = now + WARN_INTERVAL
        else:
            self._unreported += 1

    def flush(self, now: float) -> None:
        """Log the summary of ignored datagrams once the interval has passed."""
        if self._unreported and now >= self._next_warning:
            log.warning("ignored %d more notify message(s) in the last %gs", self._unreported, WARN_INTERVAL)
            self._unreported = 0
            self._next_warning = now + WARN_INTERVAL
