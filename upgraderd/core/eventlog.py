"""Log lines that are nothing but the report of an event: a subscriber of the bus (core/events.py).

An owner that reports an event does not also log it; the line is written
here, from the event's own fields, in the pass and at the point where the
event was emitted (delivery is synchronous), so the log reads as before.
Lines that explain a decision in its context (why a reload failed, what a
plan changes) stay next to the decision, in the owner.
"""

from __future__ import annotations

import logging

from upgraderd.core import events as ev

log = logging.getLogger("upgraderd")


class LogLines:
    """Write one log line per reported event of the kinds below."""

    def __init__(self, bus: ev.Bus) -> None:
        bus.subscribe(ev.TemplateStarted, self.template_started)
        bus.subscribe(ev.ConnectionsRescued, self.connections_rescued)
        bus.subscribe(ev.WatchTriggered, self.watch_triggered)
        bus.subscribe(ev.OrphansTakenOver, self.orphans_taken_over)
        bus.subscribe(ev.ReexecFailed, self.reexec_failed)

    def template_started(self, e: ev.TemplateStarted) -> None:
        """Log a generation's template."""
        log.info("generation %d: template pid %d started%s", e.generation, e.pid,
                 " (warm standby)" if e.kind == "warm" else "")

    def connections_rescued(self, e: ev.ConnectionsRescued) -> None:
        """Log connections taken from a dead slot's socket."""
        log.info("generation %d slot %d: took %d connection(s) queued on its socket (%s %s), "
                 "handing them to slot(s) %s", e.generation, e.slot, e.count, e.listener, e.address,
                 ", ".join(map(str, e.takers)))

    def watch_triggered(self, e: ev.WatchTriggered) -> None:
        """Log a real change of a watched path."""
        log.info("watched path changed: %s; reloading %s", ", ".join(e.paths), e.config_path)

    def orphans_taken_over(self, e: ev.OrphansTakenOver) -> None:
        """Log the drain of a dead master's orphans."""
        log.info("draining %d orphaned worker(s) of the dead master: %s", e.count, " ".join(map(str, e.pids)))

    def reexec_failed(self, e: ev.ReexecFailed) -> None:
        """Log an exec of the master that returned."""
        log.error("master upgrade failed, carrying on as before: cannot exec %s: %s", e.command, e.error)
