"""`upgraderd run`: take the pidfile lock, bind, then serve in the foreground or detached.

This is the one place that wires the daemon, start to finish and in this
order: the system (system/posix.py `posix_system`), the event bus and what
subscribes to it besides the counters (`Service`: pidfile, status file, log
settings), the signal inbox, then the owners and the master
(core/master.py `assemble`). Nothing is assigned into any of them afterwards.

Before it binds, the master refuses to start next to another live master on
one of its addresses (exit 3), then adopts the listening sockets that outlived
the previous master: those passed to it (socket activation, the fd store) and
those of the dead master's orphaned workers (system/posix.py `outlive`). A
USR2 re-exec skips both: it inherits its own sockets.

The order makes every start-up failure reach the operator's terminal with a
non-zero exit, also with --daemon: the lock ("already running (pid N)"), the
config, and every bind happen before anything detaches.
"""

from __future__ import annotations

import logging

from upgraderd.config.schema import Config
from upgraderd.core.events import Bus
from upgraderd.core.master import assemble
from upgraderd.core.takeover import Takeover
from upgraderd.errors import FatalError
from upgraderd.metrics.telemetry import Telemetry
from upgraderd.service import status
from upgraderd.service.logsetup import LogSetup
from upgraderd.service.pidfile import PidFile
from upgraderd.service.reporting import Service
from upgraderd.system import posix
from upgraderd.system.orphanfds import OrphanSet
from upgraderd.system.signals import SignalInbox
from upgraderd.worker import proctitle

log = logging.getLogger("upgraderd")


def run(config_path: str, cfg: Config, pidfile_path: str, daemon: bool = False,
        log_level: str | None = None) -> int:
    """Serve `config_path` until stopped; return the exit code.

    Raises AlreadyRunning, ConfigError or FatalError when the master cannot start.
    """
    proctitle.master(cfg.name)
    for warning in cfg.warnings:   # held (below) until the log is set up, like every start-up line
        log.warning("%s", warning)
    pidfile = PidFile(pidfile_path)
    handover = posix.inherited_handover()
    lock_fd = handover.fds.get("pidfile_lock") if handover is not None else None
    if lock_fd is not None:
        # Exec'd in place by SIGUSR2: the lock is already ours, and the pidfile
        # names this very process.
        pidfile.adopt(int(lock_fd))
        stale = None
    else:
        try:
            stale = pidfile.acquire()
        except OSError as e:
            raise FatalError(f"cannot lock {pidfile.lock_path}: {e.strerror}") from None
    logs = LogSetup(daemon=daemon, level=log_level)
    # What a SIGUSR2 re-exec runs: the same command, in the foreground (an exec'd
    # daemon is already detached and keeps its log file as stdout and stderr).
    argv = ["run", "-c", config_path, "--pidfile", pidfile_path]
    argv += ["--log-level", log_level] if log_level else []
    held = _Held()
    try:
        with held:
            adopted, orphans = posix.outlive(cfg, status.path_for(pidfile.path)) if handover is None \
                else ({}, OrphanSet())
        system = posix.posix_system(handover, argv, adopted, cfg)
        bus = Bus()
        service = Service(pidfile, logs, bus)
        inbox = SignalInbox()
        taken = orphans if orphans.orphans else None
        master = assemble(config_path, system, bus=bus, argv=argv, handover=handover, metrics=Telemetry.start,
                          takeover=Takeover(taken, bus) if taken is not None else None,
                          handover_fds=service.handover_fds, pending_signals=inbox.drain)
        try:
            master.prepare(cfg)
        except OSError as e:
            raise FatalError(e.strerror or str(e)) from None
        if not daemon:
            _open_log(logs, cfg)
            held.replay()
    except BaseException:
        held.replay()   # warnings reach stderr even though the log was never set up
        pidfile.remove()
        raise
    if daemon:
        from upgraderd.service.daemonize import Detached, run_detached
        return run_detached(Detached(master, system, inbox, service, posix.fds_to_keep(system, taken)),
                            cfg, pidfile, logs, stale, held.replay)
    if stale:
        log.warning("%s", stale)
    try:
        return posix.run(master, system, inbox)
    finally:
        service.close()


def _open_log(logs: LogSetup, cfg: Config) -> None:
    try:
        logs.apply(cfg.log)
    except OSError as e:
        raise FatalError(f"cannot open log file {cfg.log.file}: {e.strerror}") from None


class _Held(logging.Handler):
    """Keep what start-up logs before the log is set up, to replay it there once it is."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._level = log.level

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> _Held:
        log.addHandler(self)
        log.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        log.removeHandler(self)
        log.setLevel(self._level)

    def replay(self) -> None:
        """Log the held records through the handlers set up since."""
        for record in self.records:
            if log.isEnabledFor(record.levelno):
                log.handle(record)
        self.records.clear()
