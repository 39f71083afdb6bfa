"""One connection of the built-in apps' event loop (server.py), its listener, and what an app does with its bytes.

The data path is short (bench/seed_echo.py compares it with a C++ server, and
docs/workers.md gives the figures):
- epoll directly, with no selectors layer; a listener's event accepts one
  connection (nginx's `multi_accept off`), so an empty queue costs no EAGAIN;
- `_accept` of CPython's socket (what accept() calls, without converting the
  peer address), wrapped in the C-level `_socket.socket`, not its Python
  subclass, whose __init__ and close() add three Python calls per connection
  (a connection that moves to another worker gets a full `socket.socket` then,
  `full_socket`); the fd stays blocking, and every read and write of it says
  MSG_DONTWAIT, which spares an ioctl per connection; TCP_NODELAY is set once
  on the listener, and accepted sockets inherit it (Linux);
- a reply is sent straight from the read, and the connection is watched for
  writing only if the kernel did not take it all;
- a mirror protocol (echo, `mirror = True`) is served inline in the loop: read
  into one reused buffer, send that back, no call into the protocol;
- a connection's fd is closed without EPOLL_CTL_DEL, which the close does,
  unless another process may hold the same socket (`Conn.shared`: adopted, or
  offered in a hand-off): the kernel keeps an fd in an epoll set until the
  last copy of it closes;
- counts are list increments (`tally`), written to the metric files now and
  then (connmetrics.py).
"""

from __future__ import annotations

import _socket
import select
import socket
import time
from typing import Callable, Protocol

IN, OUT = select.EPOLLIN, select.EPOLLOUT
NOWAIT = socket.MSG_DONTWAIT  # on every read and write of a connection: its fd stays blocking
close_socket = _socket.socket.close  # for a socket.socket too: its close() without two Python-level calls


class ConnectionProtocol(Protocol):
    """What a built-in app does with the bytes of one connection.

    A protocol may also set the class attribute `mirror = True` to say that
    `received()` returns its input unchanged, `closing()` stays False and it
    keeps no state (echo): the loop then sends back what it reads without
    calling the protocol, and one instance serves all of a listener's connections.
    """

    def received(self, data: bytes) -> bytes:
        """Consume `data`; return the bytes to send back."""

    def closing(self) -> bool:
        """Return True once the connection should close after its output is flushed."""

    def idle(self) -> bool:
        """Return True if no request is in progress (safe to close while draining)."""

    def drain(self) -> None:
        """The worker is draining: finish the current request, then close."""


class Conn:
    """One accepted connection and its pending output."""

    __slots__ = ("sock", "proto", "out", "eof", "events", "last_io", "listener", "stay", "tally", "shared",
                 "mirror")

    def __init__(self, sock: _socket.socket, proto: ConnectionProtocol, listener: str = "",
                 tally: list[int] | None = None) -> None:
        self.sock = sock
        self.listener = listener
        self.proto = proto
        self.mirror = getattr(proto, "mirror", False) is True
        self.out = bytearray()
        self.eof = False
        self.events = IN  # what the loop's epoll set watches it for; 0: not in it
        self.last_io = time.monotonic()
        self.stay = False  # hand-off failed or impossible: drain it here
        # The listener's counts (connmetrics: ACCEPTED, CLOSED, RX, TX), set by the loop that serves it.
        self.tally = [0] * 4 if tally is None else tally
        self.shared = False  # another process may hold this socket too (hand-off): unregister before close


class Listener:
    """A TCP or Unix stream listener as the loop accepts from it."""

    __slots__ = ("name", "sock", "kind", "take", "tally", "mirror")

    def __init__(self, name: str, sock: socket.socket, tally: list[int]) -> None:
        self.name = name
        self.sock = sock
        self.tally = tally
        self.mirror: ConnectionProtocol | None = None  # the one protocol of every connection, for a mirror
        self.kind = (sock.family, sock.type, sock.proto)
        # CPython's `_accept` is what accept() calls, without its two enum conversions (~6 us in 3.11).
        self.take: Callable[[], tuple[int, object]] = getattr(sock, "_accept", None) or self._take

    def _take(self) -> tuple[int, object]:
        conn, addr = self.sock.accept()
        return conn.detach(), addr


def full_socket(conn: Conn) -> socket.socket:
    """Return `conn`'s socket as a `socket.socket`, which it becomes from now on."""
    if not isinstance(conn.sock, socket.socket):
        sock = conn.sock
        conn.sock = socket.socket(sock.family, sock.type, sock.proto, sock.detach())
    return conn.sock


def has_unread(sock: _socket.socket) -> bool:
    """Return True if a request has arrived that the loop has not read yet.

    Closing a socket with unread data sends RST, and the request is lost: such a
    connection is left for the next pass to read and answer (with Connection: close).
    """
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return False
