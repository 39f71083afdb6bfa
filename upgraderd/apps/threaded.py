"""`threads: N` for the built-in apps: N threads in one worker, each with its own epoll set.

This is the seed's third model ("threads share one epoll") done right. The
seed's version registers the listening socket and every connection in one
epoll shared by all threads, so two threads can wake for the same fd: one
accepts or reads, the other gets EAGAIN and, in that code, closes a
connection that was fine. Here nothing is shared but the kernel's listening
socket:
- each thread runs its own `server.Server` with its own epoll set and its own
  dup of every listening fd, and serves only the connections it accepted
  itself, so no connection fd is ever touched by two threads;
- a thread that loses an accept race gets EAGAIN on the listening socket and
  simply waits again; nothing is closed;
- a thread closes only its own dup at drain, so the listening socket stays
  open until the last thread lets go.

Signals reach only the main thread, whose Server (the leader) installs the
handlers and sends READY=1. When it starts draining it asks every helper to
drain too; on SIGINT it asks them to stop. A request is an Event plus a byte
on the helper's wake socket, and the helper acts on it in its own thread, so
a Server's state is only ever changed by the thread that runs it. A helper
that dies of an exception takes the process down (exit 70), so the master
respawns the slot instead of leaving that thread's connections unserved.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import traceback
from typing import Callable

from upgraderd.apps.server import ConnectionProtocol, Server


class _Helper(Server):
    """A Server for a non-main thread: no signal handlers, no READY=1, told what to do."""

    takes_handoffs = False  # the leader's thread takes hand-offs for the whole worker

    def __init__(self, listeners: dict[str, socket.socket],
                 factory: Callable[[str], ConnectionProtocol], idle_grace: float) -> None:
        # os.dup, not socket.dup: socket.dup() calls settimeout() on the copy, which
        # clears O_NONBLOCK on the open file description that every generation's
        # workers share, and a thread of an older worker would then block in accept().
        super().__init__({n: socket.socket(fileno=os.dup(s.fileno())) for n, s in listeners.items()},
                         factory, idle_grace, announce=False)
        self.drain_asked = threading.Event()
        self.stop_asked = threading.Event()

    def _install_signals(self) -> None:
        self._watch_wake()

    def ask(self, event: threading.Event) -> None:
        """Ask this helper (from another thread) to drain or stop."""
        event.set()
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # a wake-up byte is already pending

    def _dispatch(self, fd: int, mask: int) -> None:
        super()._dispatch(fd, mask)
        if fd == self._wake_r.fileno():
            if self.drain_asked.is_set() and self.draining_since is None:
                self.draining_since = -1.0
            if self.stop_asked.is_set():
                self.stop_now = True

    def run(self) -> None:
        """Serve in this thread; exit the process if serving fails."""
        try:
            self.serve()
        except BaseException:
            traceback.print_exc(file=sys.stderr)
            os._exit(70)


class _Leader(Server):
    """The main thread's Server: it gets the signals and passes drain on to the helpers."""

    def __init__(self, helpers: list[_Helper], listeners: dict[str, socket.socket],
                 factory: Callable[[str], ConnectionProtocol], idle_grace: float,
                 announce: bool) -> None:
        super().__init__(listeners, factory, idle_grace, announce)
        self.helpers = helpers

    def _start_drain(self) -> None:
        super()._start_drain()
        for h in self.helpers:
            h.ask(h.drain_asked)


def serve(listeners: dict[str, socket.socket], factory: Callable[[str], ConnectionProtocol],
          threads: int, idle_grace: float = 1.0, announce: bool = True) -> int:
    """Serve `listeners` from `threads` threads until drained; return the exit code."""
    helpers = [_Helper(listeners, factory, idle_grace) for _ in range(threads - 1)]
    leader = _Leader(helpers, listeners, factory, idle_grace, announce)
    # Handlers first: a helper accepts as soon as it starts, and the drain signal's
    # default action would kill the process with those connections in hand.
    leader._install_signals()
    running = [threading.Thread(target=h.run, name=f"server-{i + 1}") for i, h in enumerate(helpers)]
    for t in running:
        t.start()
    code = leader.serve()
    if leader.stop_now:
        for h in helpers:
            h.ask(h.stop_asked)
    for t in running:
        t.join()
    return code
