"""A master run as a service: pidfile, status file, log settings, start-up report.

`Service` subscribes to the master's events (core/events.py) on the bus it is
built with: each pass's end (the status file, a reloaded `log` section),
generation 1 serving or failing (the pidfile, the start-up report), SIGUSR1
(reopen the log), the stop beginning (the marker by which draining workers
tell a stop from a reload). Everything here runs inside the master's loop, so
nothing may raise into it: a pidfile or status file that cannot be written, a
log file that cannot be opened, or a stop marker that cannot be made is logged
and the master carries on.
"""

from __future__ import annotations

import json
import logging
import os

from upgraderd.config.schema import LogSpec
from upgraderd.contract.env import HANDOFF_DIR
from upgraderd.core import events as ev
from upgraderd.core.snapshot import PassEnded
from upgraderd.service import status
from upgraderd.service.logsetup import LogSetup
from upgraderd.service.pidfile import PidFile
from upgraderd.system import channeldir

log = logging.getLogger("upgraderd")


class StartupReport:
    """One JSON line from a detached master to the command that started it."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    @property
    def done(self) -> bool:
        """Return True once the report has been sent."""
        return self.fd is None

    def ok(self) -> None:
        """Report that the master serves."""
        self._send({"ok": True, "pid": os.getpid()})

    def fail(self, code: int, error: str) -> None:
        """Report that the master will not serve, and why."""
        self._send({"ok": False, "code": code, "error": error})

    def _send(self, doc: dict[str, object]) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.write(fd, json.dumps(doc).encode() + b"\n")
        except OSError:
            pass  # the starting command is gone; the log has the story
        finally:
            os.close(fd)


class Service:
    """What `upgraderd run` does with the master's events."""

    def __init__(self, pidfile: PidFile, logs: LogSetup, bus: ev.Bus) -> None:
        self.pidfile = pidfile
        self.status_path = status.path_for(pidfile.path)
        self.logs = logs
        self.report: StartupReport | None = None
        self.first_failure = ""
        self._last: dict[str, object] | None = None
        self._status_ok = True
        self._log_spec: LogSpec | None = None
        bus.subscribe(PassEnded, self.on_pass)
        bus.subscribe(ev.Serving, lambda _: self.on_serving())
        bus.subscribe(ev.StartFailed, lambda e: self.on_start_failed(e.reason))
        bus.subscribe(ev.LogReopenAsked, lambda _: self.on_reopen_logs())
        bus.subscribe(ev.StopBegun, lambda _: self.on_stop_begun())

    def on_stop_begun(self) -> None:
        """Mark the stop in the hand-off channel directory, before any worker is told to drain."""
        channeldir.mark_stopping(os.environ.get(HANDOFF_DIR, ""))

    def report_to(self, report: StartupReport) -> None:
        """Tell the command that started a detached master whether it serves, through `report`."""
        self.report = report

    def on_pass(self, event: PassEnded) -> None:
        """Apply a reloaded `log` section, write the status file if it changed."""
        if event.config is not None:
            self._apply_logs(event.config.log)
        data = status.document(event.snapshot)
        if data != self._last and not status.only_readiness_changed(self._last, data):
            self._write_status(data)

    def on_serving(self) -> None:
        """Write the pidfile and tell the starting command that we serve."""
        try:
            self.pidfile.write()
        except OSError as e:
            log.error("cannot write pidfile %s: %s", self.pidfile.path, e.strerror)
        if self.report is not None:
            self.report.ok()

    def on_start_failed(self, reason: str) -> None:
        """Remember why generation 1 failed, for the start-up report."""
        self.first_failure = f"the first generation failed: {reason}"

    def handover_fds(self) -> dict[str, int]:
        """Pass the pidfile lock on: released at exec, another master could take it."""
        return {"pidfile_lock": self.pidfile.fileno()}

    def on_reopen_logs(self) -> None:
        """Reopen the log file (SIGUSR1)."""
        try:
            self.logs.reopen()
        except OSError as e:
            log.error("cannot reopen the log file: %s", e)

    def _apply_logs(self, spec: LogSpec) -> None:
        if spec is self._log_spec:
            return  # tried already: a file that cannot be opened is reported once
        self._log_spec = spec
        try:
            self.logs.apply(spec)
        except OSError as e:
            log.error("cannot open log file %s: %s; logging where it did before", spec.file, e.strerror)

    def _write_status(self, data: dict[str, object]) -> None:
        try:
            status.write(self.status_path, data)
        except OSError as e:
            if self._status_ok:
                log.error("cannot write status file %s: %s", self.status_path, e.strerror)
            self._status_ok = False
            return
        self._last, self._status_ok = data, True

    def close(self) -> None:
        """Remove the status file and the pidfile, and release the lock (a clean stop)."""
        try:
            os.unlink(self.status_path)
        except OSError:
            pass
        self.pidfile.remove()
