"""Talk to a running master from another process: reload, stop, status.

The master is found through its pidfile (pidfile.find_master checks that the
pid holds the pidfile's lock, and pidfile.send_signal checks it again through
a pidfd, so nothing is ever sent to a process that is not that master) and observed through
its status file (status.py). These are short-lived client commands, so they
may wait: they watch the master's pid with a pidfd, which becomes readable
the moment the master exits, and re-read the status file between waits.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from typing import Any

from upgraderd.service import status
from upgraderd.service.pidfile import NotRunning, alive, find_master, send_signal

EXIT_OK, EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_TIMEOUT = 0, 1, 4, 5
POLL = 0.05


def reload(pidfile: str, timeout: float) -> int:
    """Send SIGHUP and wait for the outcome: 0 if the new generation is ACTIVE, 1 if not."""
    pid = find_master(pidfile)
    path = status.path_for(pidfile)
    before = status.read(path)
    if before is None or before.get("pid") != pid:
        raise NotRunning(f"master pid {pid} has not written its status file {path} yet")
    send_signal(pidfile, pid, signal.SIGHUP)
    doc = _wait(pid, timeout, lambda d: d["last_reload"]["covers"] > before["hups"], path)
    if doc is None:
        if not alive(pid):
            print(f"upgraderd: the master (pid {pid}) exited during the reload", file=sys.stderr)
            return EXIT_FAILED
        print(f"upgraderd: no reload outcome within {timeout:g}s; `upgraderd status` shows "
              "where it is", file=sys.stderr)
        return EXIT_TIMEOUT
    if doc["last_reload"]["result"] == "success":
        print(f"reload done: generation {doc['last_reload']['generation']} ACTIVE")
        return EXIT_OK
    print(f"upgraderd: reload {status.describe_reload(doc)}", file=sys.stderr)
    return EXIT_FAILED


def stop(pidfile: str, fast: bool, timeout: float) -> int:
    """Send SIGTERM (graceful) or SIGINT (fast) and wait until the master has exited."""
    pid = find_master(pidfile)
    send_signal(pidfile, pid, signal.SIGINT if fast else signal.SIGTERM)
    end = time.monotonic() + timeout
    with _PidWatch(pid) as watch:
        while alive(pid):
            if time.monotonic() >= end:
                print(f"upgraderd: pid {pid} is still draining after {timeout:g}s", file=sys.stderr)
                return EXIT_TIMEOUT
            watch.wait(min(1.0, end - time.monotonic()))
    print(f"stopped (pid {pid})")
    return EXIT_OK


def show_status(pidfile: str, as_json: bool) -> int:
    """Print the master's pid, uptime, generations and last reload."""
    pid = find_master(pidfile)
    doc = status.read(status.path_for(pidfile))
    if doc is None or doc.get("pid") != pid:
        print(f"master pid {pid}: starting (no status file yet)")
        return EXIT_OK
    if as_json:
        print(json.dumps(doc, indent=1, sort_keys=True))
    else:
        sys.stdout.write(status.render(doc))
    return EXIT_OK


def _wait(pid: int, timeout: float, done: Any, path: str) -> dict[str, Any] | None:
    """Return the first status document for which `done(doc)` holds; None on timeout or exit."""
    end = time.monotonic() + timeout
    with _PidWatch(pid) as watch:
        while True:
            doc = status.read(path)
            if doc is not None and doc.get("pid") == pid and done(doc):
                return doc
            if not alive(pid) or time.monotonic() >= end:
                return None
            watch.wait(POLL)


class _PidWatch:
    """Wait for a short time, waking early if `pid` exits (a pidfd; a plain sleep without one)."""

    def __init__(self, pid: int) -> None:
        self.fd: int | None
        try:
            self.fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            self.fd = None

    def __enter__(self) -> _PidWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)

    def wait(self, seconds: float) -> None:
        """Return after `seconds`, or as soon as the process exits."""
        if self.fd is None:
            time.sleep(max(0.0, seconds))
        else:
            select.select([self.fd], [], [], max(0.0, seconds))
