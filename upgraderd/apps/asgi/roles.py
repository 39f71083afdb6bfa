"""What the parts of the web server see of each other, as Protocols: no module imports the one that imports it.

server.py owns the connections (h1.py, websocket.py), which call back into it,
and the hand-off (moves.py), which reaches both. Each of them types its
partner with a Protocol from here, so the import graph stays a tree
(tests/unit/test_layers.py counts annotation-only imports too).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Coroutine, Protocol

from upgraderd.apps.asgi.busy import BusyLimit
from upgraderd.apps.asgi.settings import Settings
from upgraderd.apps.connmetrics import ConnectionMetrics


class Movable(Protocol):
    """A connection moves.py can hand to another worker (h1.HttpProtocol, websocket.WebSocketProtocol)."""

    listener: str

    def idle(self) -> bool:
        """Return True at a moment it can move."""

    def handoff_state(self) -> bytes | None:
        """Return the state that moves with it (None: it cannot move after all)."""

    def detach(self) -> tuple[int, bytes]:
        """Stop reading; return the fd and the bytes read but not handled."""

    def moved(self) -> None:
        """Another worker serves it now."""

    def not_moved(self) -> None:
        """The hand-off failed: serve on here."""


class HttpConn(Protocol):
    """What a request's cycle (cycle.py) uses of its connection (h1.HttpProtocol)."""

    loop: asyncio.AbstractEventLoop
    server: WebHost
    head: bytes
    paused_writing: bool

    def write(self, data: bytes) -> None:
        """Send bytes."""

    def pause(self) -> None:
        """Stop reading."""

    def resume(self) -> None:
        """Read again."""

    async def writable(self) -> None:
        """Wait for room in the transport's buffer."""

    def draining_close(self) -> bool:
        """Return True if the next response must say Connection: close."""

    def response_done(self, cycle: Any) -> None:
        """The app sent its last body."""

    def finished(self, cycle: Any) -> None:
        """The app returned."""

    def refuse(self, status: int, body: bytes) -> None:
        """Answer an error without the app, then close."""

    def close(self) -> None:
        """Close once what is queued is written."""


class WebHost(Protocol):
    """What the connections and the hand-off use of the worker's server (server.WebServer)."""

    app: Any
    settings: Settings
    loop: asyncio.AbstractEventLoop
    listeners: dict[str, socket.socket]
    metrics: ConnectionMetrics
    moves: Any
    busy: BusyLimit
    conns: set[Any]
    websockets_open: set[Any]
    websockets: bool
    draining: bool
    date_header: bytes

    @property
    def giving(self) -> bool:
        """Return True while connections wait to move rather than close."""

    def attached(self, proto: Any) -> None:
        """A connection's protocol is connected."""

    def detached(self, proto: Any) -> None:
        """A connection closed or moved."""

    def detached_websocket(self, ws: Any) -> None:
        """A WebSocket's TCP connection ended."""

    def scope(self, proto: Any, method: str, url: bytes, version: str,
              headers: list[tuple[bytes, bytes]]) -> dict[str, Any] | None:
        """Return the ASGI scope of a request."""

    def run_app(self, cycle: Any) -> Coroutine[Any, Any, None]:
        """Run the app for one request."""

    def upgrade(self, proto: Any, scope: dict[str, Any], rest: bytes) -> None:
        """Take a WebSocket handshake."""

    def offer(self, proto: Any) -> bool:
        """Move an idle connection if draining; return True if it is gone."""

    def log_request(self, proto: Any, cycle: Any) -> None:
        """Log an answered request."""

    def log_error(self, proto: Any, status: int) -> None:
        """Log a refused request."""

    def adopt(self, sock: socket.socket, listener: str, unhandled: bytes, state: bytes = b"") -> None:
        """Serve a connection accepted or moved here (with a moving response's `state`)."""

    def adopt_websocket(self, sock: socket.socket, listener: str, state: bytes, unhandled: bytes) -> None:
        """Serve a WebSocket moved here."""

    def no_takers(self) -> None:
        """No worker takes our connections."""
