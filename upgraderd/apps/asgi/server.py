"""The worker of an `asgi:` or `wsgi:` app: accept, serve, drain, hand off.

We own the accept loop (a reader on each inherited listener, accept until
EAGAIN) rather than asyncio's `Server`: `Server.close()` can drop a
connection accepted in the same loop turn (CPython #109564), and the client
sees a reset. At drain the reader goes, what is queued is accepted, and only
then does our copy of the listener close; the kernel keeps the rest for the
next generation, which holds the same sockets.

On a `shared` listener a busy worker stops accepting and leaves the queue to
the others (`http.busy_limit`: busy.py).

Order at start-up: signal handlers, lifespan startup, the hand-off channel,
the listeners, then READY=1. A READY=1 before the drain handler exists could
let SIGTERM's default action kill us with connections in hand.

Drain, with `drain.handoff: auto` and a taker in the ACTIVE generation: every
idle keep-alive connection moves now (moves.py); a connection with a request
in progress moves right after its response. Without a taker, the last resort:
the next response says `Connection: close`, idle connections close after
IDLE_GRACE. The worker exits when no connection is left, after the lifespan
shutdown. SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
import sys
import time
from email.utils import formatdate
from typing import Any, Callable
from urllib.parse import unquote

import httptools

from upgraderd import worker
from upgraderd.apps import logline
from upgraderd.apps.asgi import accesslog, streammove
from upgraderd.apps.asgi.busy import BusyLimit
from upgraderd.apps.asgi.reqmetrics import RequestMetrics
from upgraderd.apps.asgi.cycle import Cycle
from upgraderd.apps.asgi.h1 import HttpProtocol
from upgraderd.apps.asgi.lifespan import App, Lifespan
from upgraderd.apps.asgi.moves import WebMoves
from upgraderd.apps.asgi.settings import Settings
from upgraderd.apps.connmetrics import ACCEPTED, CLOSED, ConnectionMetrics
from upgraderd.worker.outlive import OrphanWatch

IDLE_GRACE = 1.0     # seconds an idle connection is kept after the drain starts (no taker)
END_MARGIN = 1.0     # at most: seconds before drain.timeout (the master's SIGKILL) that responses in progress end
ACCEPT_BATCH = 32    # connections accepted per listener wake-up
WS_MOVE_WAIT = 2.0   # seconds a WebSocket that opted in may take to reach a message boundary, else 1012
TICK = 0.5           # housekeeping: timeouts, the date header, metric files, the parent check, drain progress
ASGI = {"version": "3.0", "spec_version": "2.3"}


class WebServer:
    """One worker's HTTP server over the inherited listeners."""

    def __init__(self, app: App, settings: Settings, listeners: dict[str, socket.socket]) -> None:
        self.app, self.settings, self.listeners = app, settings, listeners
        self.loop = asyncio.get_event_loop()
        self.conns: set[HttpProtocol] = set()
        self.attaching = 0          # accepted sockets whose protocol is not connected yet
        self.busy = BusyLimit(self.loop, settings.busy_limit, settings.shared, lambda: self.attaching, self._accept)
        self.draining = False
        self.drained_at = 0.0
        self.done = self.loop.create_future()
        self.state: dict[str, Any] = {}
        self.date_header = b""
        self.websockets = _have_wsproto()
        self.websockets_open: set[Any] = set()   # websocket.WebSocketProtocol (imported with wsproto)
        self.metrics = ConnectionMetrics(list(listeners))
        self.tally = {name: self.metrics.tally(name) for name in listeners}
        self.requests = RequestMetrics(list(listeners), self.metrics.enabled)
        self.moves = WebMoves(self)
        self.orphan = OrphanWatch()
        self.log = accesslog.AccessLog(settings.access_log)
        self._tick()

    @property
    def giving(self) -> bool:
        """Return True while connections wait to move rather than close."""
        return self.moves.giving

    async def serve(self) -> int:
        """Serve until drained; return the exit code."""
        self.loop.add_signal_handler(worker.drain_signal(), self.drain)
        if worker.drain_signal() != signal.SIGTERM:
            self.loop.add_signal_handler(signal.SIGTERM, self.drain)
        self.loop.add_signal_handler(signal.SIGINT, self._stop_now)
        lifespan = Lifespan(self.app, self.settings.lifespan, self.state)
        if not await lifespan.startup():
            return 3
        if not self.moves.open():
            await lifespan.shutdown()
            return 1   # before READY=1: the generation fails, the old workers keep their connections
        for name, lsock in self.listeners.items():
            lsock.setblocking(False)
            self.loop.add_reader(lsock.fileno(), self._accept, name, lsock)
        worker.ready(f"serving {', '.join(self.listeners)}")
        code = await self.done
        if code == 0:
            await lifespan.shutdown()
        self.moves.close()
        self._flush_metrics()
        return int(code)

    # -- accepting --

    def _accept(self, name: str, lsock: socket.socket) -> None:
        limited = self.busy.applies(name)
        for _ in range(ACCEPT_BATCH):
            if limited and self.busy.busy():
                self.busy.pause(name, lsock)
                return
            try:
                sock, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                return   # EMFILE and friends: leave the rest queued, the kernel keeps them
            self.tally[name][ACCEPTED] += 1
            self.adopt(sock, name, b"")

    def adopt(self, sock: socket.socket, listener: str, unhandled: bytes, state: bytes = b"") -> None:  # noqa: D401
        """Serve `sock` (accepted here, or moved here with `unhandled` bytes and, for a response
        in progress, its `state`: streammove.py)."""
        stream = None
        if state:
            try:
                stream = streammove.decode(state, {"asgi": ASGI, "state": self.state.copy()})
            except ValueError:
                sock.close()   # not ours to read: the client sees the connection end
                return
        self.attaching += 1
        self.loop.create_task(self._attach(sock, listener, unhandled, stream))

    async def _attach(self, sock: socket.socket, listener: str, unhandled: bytes,
                      stream: tuple[dict[str, Any], int, bool] | None = None) -> None:
        try:
            _t, proto = await self.loop.connect_accepted_socket(lambda: HttpProtocol(self, listener), sock)
        except OSError:
            sock.close()
            return
        finally:
            self.attaching -= 1
            if self.busy.paused:
                self.busy.resume()
        if stream is not None:
            proto.resume_stream(*stream)
        if unhandled:
            proto.data_received(unhandled)

    def attached(self, proto: HttpProtocol) -> None:
        """A connection's protocol is connected."""
        self.conns.add(proto)
        if self.draining and not self.giving:
            self.loop.call_later(IDLE_GRACE, proto.drain_idle)

    def detached(self, proto: HttpProtocol) -> None:
        """A connection closed or moved."""
        if proto in self.conns:
            self.conns.discard(proto)
            self.tally[proto.listener][CLOSED] += 1

    # -- serving --

    def scope(self, proto: HttpProtocol, method: str, url: bytes, version: str,
              headers: list[tuple[bytes, bytes]]) -> dict[str, Any] | None:
        """Return the ASGI http scope of a request, or None if its target is not a path."""
        target = decode_path(url)
        if target is None:
            return None
        path, raw_path, query = target
        client, scheme, server = proto.client, "http", proto.sockname
        if client is not None and self.settings.trusts(client[0]):
            client, scheme = accesslog.forwarded(headers, client, self.settings.trusts)
        root = self.settings.root_path
        return {"type": "http", "asgi": ASGI, "http_version": version, "method": method, "scheme": scheme,
                "path": root + path if root and not path.startswith(root) else path,
                "raw_path": raw_path, "query_string": query, "root_path": root, "headers": headers,
                "client": client, "server": server, "state": self.state.copy(),
                "extensions": {streammove.EXTENSION: streammove.extension()} if self.moves.enabled else {}}

    async def run_app(self, cycle: Cycle) -> None:
        """Run the app for one request; a failure is a 500 (or a close, once answering)."""
        proto = cycle.conn
        try:
            await self.app(cycle.scope, cycle.receive, cycle.send)
        except asyncio.CancelledError:
            pass
        except Exception as e:
            # Not an app failure: its response goes on in another worker (moved), or we ended it (cut_off).
            if not cycle.moved and not cycle.cut_off:
                logline.log(f"upgraderd worker: the app failed on {cycle.scope['method']} {cycle.scope['path']}: "
                            f"{type(e).__name__}: {e}", "ERROR")
                proto.refuse(500, b"internal server error\n")
        else:
            if not cycle.started:
                proto.refuse(500, b"the application sent no response\n")
            elif not cycle.finished:
                proto.close()
        proto.finished(cycle)

    def upgrade(self, proto: HttpProtocol, scope: dict[str, Any], rest: bytes) -> None:
        """A WebSocket handshake: the connection becomes a WebSocketProtocol (websocket.py)."""
        from upgraderd.apps.asgi.websocket import WebSocketProtocol
        assert proto.transport is not None
        offered = b",".join(v for n, v in scope["headers"] if n == b"sec-websocket-protocol").decode("latin-1")
        ws_scope = {k: v for k, v in scope.items() if k != "method"}
        ws_scope.update({"type": "websocket", "scheme": "wss" if scope["scheme"] == "https" else "ws",
                         "subprotocols": [p.strip() for p in offered.split(",") if p.strip()],
                         "extensions": {"websocket.http.response": {}}})
        ws_scope["asgi"] = {"version": "3.0", "spec_version": "2.4"}
        self.conns.discard(proto)   # the TCP connection goes on, as a WebSocket
        transport = proto.transport
        proto.became_websocket()
        ws = WebSocketProtocol(self, ws_scope, proto.listener, transport)
        transport.set_protocol(ws)
        ws.start(scope, rest)

    def adopt_websocket(self, sock: socket.socket, listener: str, state: bytes, unhandled: bytes) -> None:
        """Serve a WebSocket another worker moved here (wsmove.py)."""
        from upgraderd.apps.asgi import wsmove
        from upgraderd.apps.asgi.websocket import WebSocketProtocol
        try:
            scope, subprotocol = wsmove.decode(state, {"asgi": {"version": "3.0", "spec_version": "2.4"},
                                                       "state": self.state.copy()})
        except ValueError:
            sock.close()   # not ours to read: the client sees the connection end
            return
        self.attaching += 1

        async def attach() -> None:
            try:
                _t, ws = await self.loop.connect_accepted_socket(
                    lambda: WebSocketProtocol(self, scope, listener, resumed=True), sock)
            except OSError:
                sock.close()
                return
            finally:
                self.attaching -= 1
            ws.subprotocol = subprotocol
            if unhandled:
                ws.data_received(unhandled)
        self.loop.create_task(attach())

    def detached_websocket(self, ws: Any) -> None:
        """A WebSocket's TCP connection ended."""
        self.tally[ws.listener][CLOSED] += 1

    def log_request(self, proto: HttpProtocol, cycle: Cycle) -> None:
        """One access-log line for an answered request."""
        seconds = time.monotonic() - proto.started_at
        self.requests.request(proto.listener, cycle.status, seconds)
        self.log.request(proto.client, cycle.scope, cycle.status, cycle.sent_bytes, seconds)

    def log_error(self, proto: HttpProtocol, status: int) -> None:
        """One access-log line for a request refused without the app."""
        seconds = time.monotonic() - proto.started_at if proto.started_at else 0.0
        self.requests.request(proto.listener, status, seconds)
        self.log.refused(proto.client, status)

    # -- draining --

    def drain(self) -> None:
        """The drain signal: stop accepting; move or close every connection."""
        if self.draining:
            return
        self.draining = True
        self.drained_at = time.monotonic()
        self.metrics.draining()
        self.busy.stop()   # every listener is accepted from below, then closed
        for name, lsock in self.listeners.items():
            self.loop.remove_reader(lsock.fileno())
            lsock.setblocking(False)   # shared with other generations: re-assert it before the last accepts
            while True:
                before = self.tally[name][ACCEPTED]
                self._accept(name, lsock)
                if self.tally[name][ACCEPTED] - before < ACCEPT_BATCH:
                    break
            lsock.close()
        self.moves.start()
        if not self.giving:
            self.no_takers()
        self.moves.give_websockets(self.drained_at + WS_MOVE_WAIT)
        limit = self.settings.drain_timeout
        if limit > 0:
            self.loop.call_later(max(0.0, limit - min(END_MARGIN, limit / 10)), self._end_responses)

    def _end_responses(self) -> None:
        """Just before drain.timeout: end what is still in progress (a stream that did not move) with
        its last chunk and close, so the client sees a complete response and the app its lifespan
        shutdown, rather than a SIGKILL's cut."""
        for proto in list(self.conns):
            if proto.cycle is not None:
                proto.cycle.cut()
                proto.refuse(503, b"service restarting\n")   # a 503 if nothing was sent yet, else a close

    def no_takers(self) -> None:
        """No worker takes our connections (now): the idle ones close after the grace period."""
        for proto in list(self.conns):
            self.loop.call_later(IDLE_GRACE, proto.drain_idle)

    def offer(self, proto: HttpProtocol) -> bool:
        """A connection just became idle: move it if we drain; return True if it is gone."""
        return self.draining and proto.idle() and self.moves.give([proto]) == 1

    def _flush_metrics(self) -> None:
        self.metrics.flush()
        if self.requests.enabled:
            open_ws: dict[str, int] = {}
            for ws in self.websockets_open:
                open_ws[ws.listener] = open_ws.get(ws.listener, 0) + 1
            self.requests.flush(open_ws, self.draining)

    def _stop_now(self) -> None:
        if not self.done.done():
            self.done.set_result(1)

    def _tick(self) -> None:
        self.date_header = b"date: " + formatdate(usegmt=True).encode() + b"\r\n"
        now = self.loop.time()
        for proto in list(self.conns):
            proto.expire(now)   # timeouts are checked here, to within TICK (h1.py)
        self._flush_metrics()
        if not self.draining and self.orphan.should_drain():
            self.drain()
        if self.draining:
            self.moves.retry()
            if self.websockets_open:
                self.moves.give_websockets(self.drained_at + WS_MOVE_WAIT)
            if not self.conns and not self.websockets_open and not self.attaching and not self.done.done():
                self.done.set_result(0)
        if not self.done.done():
            self.loop.call_later(TICK if not self.draining else 0.05, self._tick)


def main(app: App, settings: Settings, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> int:
    """Run one worker of `app` over the inherited listeners; return the exit code."""
    socks = worker.listeners()
    if not socks:
        print("error: no listening sockets (LISTEN_FDS/LISTEN_PID not set); run me under upgraderd",
              file=sys.stderr)
        return 2
    loop = (loop_factory or _new_loop)()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(WebServer(app, settings, socks).serve())
    finally:
        sys.stderr.flush()


def decode_path(url: bytes) -> tuple[str, bytes, bytes] | None:
    """Split a request target into (path, raw path, query); None if it is not origin-form."""
    parsed = httptools.parse_url(url)
    raw = parsed.path or b"/"
    if not raw.startswith(b"/"):
        return None
    return unquote(raw.decode("latin-1")), raw, parsed.query or b""


def _have_wsproto() -> bool:
    try:
        import wsproto  # noqa: F401
    except ImportError:
        return False
    return True


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed (what uvicorn[standard] uses), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
