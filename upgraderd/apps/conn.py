"""One connection of the built-in apps' event loop (server.py), and what an app does with its bytes."""

from __future__ import annotations

import selectors
import socket
import time
from typing import Protocol


class ConnectionProtocol(Protocol):
    """What a built-in app does with the bytes of one connection."""

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

    __slots__ = ("sock", "proto", "out", "eof", "events", "last_io", "listener", "stay")

    def __init__(self, sock: socket.socket, proto: ConnectionProtocol, listener: str = "") -> None:
        self.sock = sock
        self.listener = listener
        self.proto = proto
        self.out = bytearray()
        self.eof = False
        self.events = selectors.EVENT_READ
        self.last_io = time.monotonic()
        self.stay = False  # hand-off failed or impossible: drain it here
