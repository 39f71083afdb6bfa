"""The worker side: a library for a worker program's listeners, readiness, status and drain.

This package runs inside workers, never in the master (the master's rescue
path uses its `Giver`), and imports nothing of the project but
`upgraderd.contract`, the names and layouts both sides agree on. Its public
API is `upgraderd.worker`, typed; the built-in apps in `upgraderd.apps` use it too.

A worker started by upgraderd (or by systemd socket activation) gets its
listening sockets as fds 3, 4, ... with `LISTEN_FDS`, `LISTEN_PID` and
`LISTEN_FDNAMES`, and a datagram socket to report readiness on in
`NOTIFY_SOCKET`. Listeners in `worker-bind` mode are not passed: their names
are in `UPGRADERD_WORKER_BIND` and their addresses in `UPGRADERD_ADDR_<NAME>`,
and `listeners()` binds them itself with SO_REUSEPORT. This module gives a
Python server those abilities (docs/workers.md is the full contract):

    from upgraderd import worker
    socks = worker.listeners()            # {"web": <socket>, ...}
    drain = worker.on_drain()             # install the handler first ...
    ... start serving in threads ...
    worker.ready()                        # ... then say ready
    drain.wait()                          # main thread: until the drain signal
    if drain.reason == "stop":            # the master stops: nobody takes connections,
        ... close them now ...            # so don't wait for them (or for drain.timeout)
    else:                                 # "reload": a successor serves (hand-off, docs/workers.md §8)
        ... stop accepting, finish requests, exit ...

config/examples/python_worker.py is a complete example.

Order matters: install the drain handler *before* calling `ready()`. The
master may drain this worker as soon as a successor is ready, and the drain
signal's default action (SIGTERM: terminate) would kill it with accepted
connections in hand.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from types import FrameType
from typing import Callable

from upgraderd.contract import env, wire
from upgraderd.contract import notify as messages
from upgraderd.contract.notify import notify

SD_LISTEN_FDS_START = env.LISTEN_FDS_START   # public since 0.1; the contract names it
RELOAD, STOP = "reload", "stop"   # the values of `Drain.reason` once the drain signal came


def listeners(unset_env: bool = True, bind: bool = True) -> dict[str, socket.socket]:
    """Return the listening sockets by name: inherited ones, then worker-bind ones.

    Inherited sockets follow the systemd protocol; those whose name is
    missing are called `fd3`, `fd4`, ... They are skipped when `LISTEN_PID`
    names another process (the variables were meant for a parent). With
    `unset_env`, the LISTEN_* variables are removed so that child processes
    do not mistake them for their own. With `bind`, every listener named in
    `UPGRADERD_WORKER_BIND` is bound here (see `bind_reuseport`).
    """
    out = _inherited(unset_env)
    if bind:
        for name in filter(None, os.environ.get(env.WORKER_BIND, "").split(":")):
            out[name] = bind_reuseport(os.environ[env.addr_env_name(name)])
    return out


def bind_reuseport(address: str, backlog: int = socket.SOMAXCONN) -> socket.socket:
    """Bind and listen on `address` (host:port, IPv6 as [::1]:port) with SO_REUSEPORT.

    Every worker of every generation binds the same address; the kernel
    spreads new connections over all of them.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _inherited(unset_env: bool) -> dict[str, socket.socket]:
    try:
        count = int(os.environ.get(env.LISTEN_FDS, "0"))
        pid = int(os.environ.get(env.LISTEN_PID, "0"))
    except ValueError:
        return {}
    if count <= 0 or pid != os.getpid():
        return {}
    names = os.environ.get(env.LISTEN_FDNAMES, "").split(":")
    out: dict[str, socket.socket] = {}
    for i in range(count):
        fd = env.LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        out[name] = socket.socket(fileno=fd)
    if unset_env:
        for var in env.LISTEN_VARS:
            os.environ.pop(var, None)
    return out


def ready(status_text: str | None = None) -> bool:
    """Tell the master this worker is ready (READY=1); return False outside upgraderd."""
    return notify(messages.ready(status_text))


def status(text: str) -> bool:
    """Send a free-form STATUS= line to the master."""
    return notify(messages.status(text))


def drain_signal() -> signal.Signals:
    """Return the signal the master drains this worker with (UPGRADERD_DRAIN_SIGNAL)."""
    name = os.environ.get(env.DRAIN_SIGNAL, "TERM").upper()
    try:
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except KeyError:
        return signal.SIGTERM


def stopping() -> bool:
    """Return True once the master is stopping (not reloading): no generation will take over.

    The master creates a marker in its hand-off channel directory before it
    sends a stop's drain signal (contract/wire.py `stop_marker`); a reload, a
    failed generation or a slot retired by TTOU leaves it absent. Outside
    upgraderd (no directory) this is always False.
    """
    directory = os.environ.get(env.HANDOFF_DIR, "")
    return directory.startswith("/") and os.path.lexists(wire.stop_marker(directory))


class Drain:
    """A drain request: `requested` turns True when the drain signal arrives.

    `reason` says why: None before the signal, then "reload" (a successor, or
    a sibling, may take your connections: hand them off or finish them) or
    "stop" (the master stops: nobody will take them; close them now instead
    of serving on until `drain.timeout`). It is read anew on each access, so
    a worker still draining from a reload sees "stop" once the master stops.
    """

    def __init__(self, callback: Callable[[], None] | None = None) -> None:
        self.requested = False
        self._callback = callback

    @property
    def reason(self) -> str | None:
        """Return None before the drain signal, then "stop" if the master is stopping, else "reload"."""
        if not self.requested:
            return None
        return STOP if stopping() else RELOAD

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self._callback is not None:
            self._callback()

    def wait(self, timeout: float | None = None, poll: float = 0.1) -> bool:
        """Block until the drain signal arrived, or `timeout` passed; return `requested`.

        Call it from the main thread. It polls instead of blocking on a lock:
        Python runs signal handlers only in the main thread, between bytecodes,
        and a signal the kernel delivered to another thread does not wake a main
        thread blocked in `Event.wait()` or `join()`, which could then sleep
        through the drain until the master's SIGKILL.
        """
        end = None if timeout is None else time.monotonic() + timeout
        while not self.requested and (end is None or time.monotonic() < end):
            time.sleep(poll)
        return self.requested


def on_drain(callback: Callable[[], None] | None = None) -> Drain:
    """Install the drain-signal handler now; return the `Drain` it sets.

    `callback`, if given, runs in the main thread as a signal handler: keep it
    to setting flags or writing to a pipe. Taking a lock there (even
    `threading.Event.set()`) can deadlock against the main thread. After the
    drain signal the master waits `drain.timeout`, then sends SIGKILL. If the
    drain signal is not SIGTERM, SIGTERM drains too. `Drain.reason` tells a
    reload's drain ("reload") from the master's stop ("stop").
    """
    drain = Drain(callback)
    signal.signal(drain_signal(), drain._on_signal)
    if drain_signal() != signal.SIGTERM:
        signal.signal(signal.SIGTERM, drain._on_signal)
    return drain
