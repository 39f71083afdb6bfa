"""Helpers for a worker program: its listeners, readiness, status and drain.

A worker started by upgraderd (or by systemd socket activation) gets its
listening sockets as fds 3, 4, ... with `LISTEN_FDS`, `LISTEN_PID` and
`LISTEN_FDNAMES`, and a datagram socket to report readiness on in
`NOTIFY_SOCKET`. This module gives a Python server those abilities:

    from upgraderd import worker
    socks = worker.listeners()            # {"web": <socket>, ...}
    worker.on_drain(lambda: server.stop_accepting())
    ... start serving ...
    worker.ready()                        # only after the drain handler is installed

Order matters: install the drain handler *before* calling `ready()`. The
master may drain this worker as soon as a successor is ready, and the drain
signal's default action (SIGTERM: terminate) would kill it with accepted
connections in hand.
"""

from __future__ import annotations

import os
import signal
import socket
from types import FrameType
from typing import Callable

from upgraderd.notify import notify

SD_LISTEN_FDS_START = 3


def listeners(unset_env: bool = True) -> dict[str, socket.socket]:
    """Return the inherited listening sockets by name (the systemd protocol).

    Sockets whose name is missing are called `fd3`, `fd4`, ... Returns an
    empty dict when `LISTEN_PID` names another process (the variables were
    meant for a parent). With `unset_env`, the variables are removed so that
    child processes do not mistake them for their own.
    """
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
        pid = int(os.environ.get("LISTEN_PID", "0"))
    except ValueError:
        return {}
    if count <= 0 or pid != os.getpid():
        return {}
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    out: dict[str, socket.socket] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        out[name] = socket.socket(fileno=fd)
    if unset_env:
        for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    return out


def ready(status_text: str | None = None) -> bool:
    """Tell the master this worker is ready (READY=1); return False outside upgraderd."""
    msg = "READY=1" + (f"\nSTATUS={status_text}" if status_text else "")
    return notify(msg)


def status(text: str) -> bool:
    """Send a free-form STATUS= line to the master."""
    return notify(f"STATUS={text}")


def drain_signal() -> signal.Signals:
    """Return the signal the master drains this worker with (UPGRADERD_DRAIN_SIGNAL)."""
    name = os.environ.get("UPGRADERD_DRAIN_SIGNAL", "TERM").upper()
    try:
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except KeyError:
        return signal.SIGTERM


def on_drain(callback: Callable[[], None]) -> None:
    """Call `callback` (in the main thread) when the master asks this worker to drain."""
    def handler(signum: int, frame: FrameType | None) -> None:
        callback()
    signal.signal(drain_signal(), handler)
