"""`upgraderd run --daemon`: detach with python-daemon, yet report the start-up outcome.

Order, and why:
1. The command (in the foreground) loads the config, takes the pidfile lock
   and binds every listener, so "already running" and "address in use" reach
   the operator's terminal with a non-zero exit.
2. It forks. The child enters `DaemonContext` (which forks twice more and
   detaches from the terminal) with the listener fds, the notify socket, the
   lock and a report pipe in `files_preserve`, an empty `signal_map`, working
   directory / and umask 022, stdin on /dev/null and stdout/stderr on the log
   file. DaemonContext closes every other fd.
3. The daemon installs upgraderd's own signal handlers (system/posix.py
   `run` does, entering the signal inbox after open()) and starts generation 1.
4. Once generation 1 is ACTIVE the pidfile is written and one line goes back
   through the pipe; the waiting command prints it and exits 0. If the daemon
   fails first, the line carries the reason and exit code; if it dies without
   a word, the pipe closes and the command says so.

The pipe's write end is close-on-exec, so workers never hold it open.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable

import daemon  # type: ignore[import-untyped]  # python-daemon ships no type hints

from upgraderd.config.schema import Config
from upgraderd.core.seams import Loop, System
from upgraderd.errors import ExitCode
from upgraderd.service.logsetup import LogSetup
from upgraderd.service.pidfile import PidFile
from upgraderd.service.reporting import Service, StartupReport
from upgraderd.system import posix
from upgraderd.system.signals import SignalInbox

log = logging.getLogger("upgraderd")


@dataclass(frozen=True)
class Detached:
    """What the runner wired, to serve once detached; `keep`: the fds DaemonContext must not close."""

    master: Loop
    system: System
    inbox: SignalInbox
    service: Service
    keep: list[int]


def run_detached(wired: Detached, cfg: Config, pidfile: PidFile, logs: LogSetup,
                 stale: str | None, replay: Callable[[], None] = lambda: None) -> int:
    """Detach and serve in the background; return the exit code for the starting command.

    The master has been prepared (config loaded, listeners bound) from `cfg`,
    whose `log.file` must be set: a daemon has no terminal to log to.
    """
    assert cfg.log.file is not None
    log_file = cfg.log.file
    r, w = os.pipe()
    child = os.fork()
    if child:
        os.close(w)
        return _wait_for_report(r, child, log_file)
    os.close(r)
    report = StartupReport(w)
    code: int = ExitCode.CRASHED
    try:
        code = _serve(wired, cfg, pidfile, logs, stale, report, replay)
    except BaseException as e:  # the daemon has no caller to raise to: log and report it
        log.exception("upgraderd crashed")
        report.fail(ExitCode.CRASHED, f"crashed: {e!r}; see {log_file}")
    finally:
        logging.shutdown()
        os._exit(code)


def _serve(wired: Detached, cfg: Config, pidfile: PidFile, logs: LogSetup,
           stale: str | None, report: StartupReport, replay: Callable[[], None]) -> int:
    log_file = cfg.log.file or os.devnull
    with open(log_file, "a", encoding="utf-8") as out:
        ctx = daemon.DaemonContext(
            working_directory="/", umask=0o022, detach_process=True, signal_map={},
            files_preserve=[report.fd, pidfile.fileno(), *wired.keep],
            stdin=None, stdout=out, stderr=out)
        ctx.open()
    # DaemonContext closes fd 0 before opening /dev/null for stdin, so it gets
    # fd 0 back close-on-exec and its dup2(0, 0) cannot clear that: workers
    # would start without a stdin, and their first open() would become fd 0.
    for fd in (0, 1, 2):
        os.set_inheritable(fd, True)
    pidfile.claim()
    logs.apply(cfg.log)
    replay()  # what start-up logged before the log existed (adopted sockets, orphans)
    if stale:
        log.warning("%s", stale)
    service = wired.service
    service.report_to(report)
    try:
        code = posix.run(wired.master, wired.system, wired.inbox)
    finally:
        service.close()
    report.fail(code, service.first_failure or f"the master exited with code {code} before "
                f"serving; see {log_file}")
    return code


def _wait_for_report(fd: int, child: int, log_file: str) -> int:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    os.close(fd)
    os.waitpid(child, 0)
    try:
        doc = json.loads(b"".join(chunks).decode())
    except ValueError:
        print(f"upgraderd: the daemon exited before it was serving; see {log_file}", file=sys.stderr)
        return ExitCode.CANNOT_START
    if doc.get("ok"):
        print(f"upgraderd: serving in the background (pid {doc['pid']}); log {log_file}")
        return ExitCode.OK
    print(f"upgraderd: {doc.get('error')}", file=sys.stderr)
    return int(doc.get("code") or ExitCode.FAILED)
