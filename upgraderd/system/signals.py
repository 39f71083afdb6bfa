"""Receive signals without doing anything inside a signal handler.

Design note: the Python-level handlers are no-ops. They must exist, because a
C-level handler only writes to the wakeup fd when a Python handler is
installed. The byte `set_wakeup_fd` writes is the signal number (the asyncio
idiom), so reading the socketpair tells which signals arrived; duplicates
coalesce into a set. No logging, no locks and no state change happen in the
handler (logging there can deadlock). The main loop selects on `fileno()`.
"""

from __future__ import annotations

import signal
import socket
from types import FrameType, TracebackType
from typing import Any, Iterable

HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGCHLD,
           signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)


def _record(signum: int, frame: FrameType | None) -> None:
    """Do nothing: the C handler has already written the signal number to the wakeup fd."""


class SignalInbox:
    """A context manager that routes `signals` to a socketpair the loop can select on."""

    def __init__(self, signals: Iterable[signal.Signals] = HANDLED) -> None:
        # The socketpair is made on entry, not here: the inbox is built (and its
        # `drain` handed to the master) before a --daemon master detaches, which
        # closes every fd it is not told to keep.
        self.signals = tuple(signals)
        self._rsock: socket.socket | None = None
        self._wsock: socket.socket | None = None
        self._old_handlers: dict[signal.Signals, Any] = {}
        self._old_wakeup = -1

    def __enter__(self) -> SignalInbox:
        self._rsock, self._wsock = socket.socketpair()
        self._rsock.setblocking(False)
        self._wsock.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._wsock.fileno(), warn_on_full_buffer=False)
        for sig in self.signals:
            self._old_handlers[sig] = signal.signal(sig, _record)
        # A master exec'd by SIGUSR2 starts with these blocked (see reexec.py): what
        # arrived during the exec is delivered now, to the handlers just installed.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        signal.set_wakeup_fd(self._old_wakeup)
        if self._rsock is not None and self._wsock is not None:
            self._rsock.close()
            self._wsock.close()
        self._rsock = self._wsock = None

    def fileno(self) -> int:
        """Return the fd to select on (inside the `with` block only)."""
        assert self._rsock is not None, "the inbox is not open"
        return self._rsock.fileno()

    def drain(self) -> set[signal.Signals]:
        """Return the set of signals received since the last call (none outside the `with` block)."""
        got: set[signal.Signals] = set()
        if self._rsock is None:
            return got
        while True:
            try:
                data = self._rsock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return got
            if not data:
                return got
            for b in data:
                try:
                    got.add(signal.Signals(b))
                except ValueError:
                    continue
