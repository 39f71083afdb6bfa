"""One HTTP/1.1 connection: httptools parses, the ASGI app answers, and between requests it may move.

The parser is llhttp (through httptools), strict: Content-Length with
Transfer-Encoding, two Content-Lengths, obsolete line folding, bad chunk
sizes and bare LFs are parse errors, answered with 400 and a close. Limits:
a head over `max_header_bytes` gets 431, a body over `max_body_bytes` 413, a
head not complete within `header_timeout` 408 (slowloris); each closes.

One request at a time: bytes that arrive while a response is still being
written (pipelining) are kept in `pending`, unparsed, and reading pauses;
they are parsed once the response is done. So between two requests the
connection's state is exactly (nothing, `pending`), which is what a hand-off
moves (`detach()`): the socket, and `pending` as the bytes read but not
handled. A connection in the middle of a request never moves, but for a
streaming response whose app opted in (streammove.py): it moves between two
sends, and the app here is told it is gone (`Cycle.gone`).

Hazard: a protocol is also the transport's; `abort()` after a hand-off must
not report the client as gone to an app (no cycle is running then).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Callable, cast

import httptools

from upgraderd.apps.asgi.cycle import Cycle, status_line

# After an error answer the client may still be sending (a head or body we refused): closing
# with unread bytes makes the kernel send RST, which can destroy the answer before the client
# reads it. So half-close and read-and-drop for a while first (nginx's lingering close).
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20

if TYPE_CHECKING:
    from upgraderd.apps.asgi.roles import WebHost


class HttpProtocol(asyncio.Protocol):
    """An asyncio protocol serving one client connection to an ASGI app."""

    def __init__(self, server: WebHost, listener: str) -> None:
        self.server = server
        self.listener = listener
        self.loop = server.loop
        self.settings = server.settings
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.in_message = False
        self.cycle: Cycle | None = None
        self.pending = b""
        self.head = b""
        self.closing = False
        self.paused_reading = False
        self.paused_writing = False
        self._writable: asyncio.Future[None] | None = None
        self.client: tuple[str, int] | None = None
        self.sockname: tuple[str, int] | None = None
        self.timer: Callable[[], None] | None = None   # what to do at `deadline`: idle, header or request timeout
        self.deadline = 0.0
        self.body_size = 0
        self.stay = False   # a hand-off failed: drain it here (Connection: close on the next answer)
        self.started_at = 0.0
        self.head_fed = 0
        self.oversize = False
        self.upgrade: dict[str, Any] | None = None   # the scope of a WebSocket handshake
        self.linger = 0   # bytes still dropped before the close, after an error answer

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are no asyncio.Transport subclass, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
        local = transport.get_extra_info("sockname")
        self.sockname = (str(local[0]), int(local[1])) if isinstance(local, tuple) else None
        self.server.attached(self)
        self._arm(self.settings.keepalive_timeout, self._idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._disarm()
        if self.cycle is not None:
            self.cycle.disconnect()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self.server.detached(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            self.linger -= len(data)
            if self.linger < 0 and self.transport is not None:
                self.transport.close()
            return
        if self.cycle is not None and not self.in_message:
            self.pending += data   # pipelined: parsed once the current response is done
            self.pause()
            return
        self._feed(data)

    def eof_received(self) -> bool | None:
        if self.cycle is not None:
            self.cycle.disconnect()
        return None   # close our side once our writes are done

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- parsing --

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgraded(data[e.args[0]:] if e.args and isinstance(e.args[0], int) else b"")
        except httptools.HttpParserError:
            self.refuse(431 if self.oversize else 400, b"bad request\n")
        if self.in_message and self.cycle is None and not self.closing:
            # A head still incomplete: httptools holds a header line until it ends, so count what we
            # fed it (the chunk a head began in counts whole: at worst an early 431 for a long pipeline).
            self.head_fed += len(data)
            if self.head_fed > self.settings.max_header_bytes:
                self.refuse(431, b"request header fields too large\n")

    def _upgraded(self, rest: bytes) -> None:
        """The parser stopped at an Upgrade: a WebSocket handshake, or an upgrade we do not speak."""
        if self.upgrade is not None:
            self.server.upgrade(self, self.upgrade, rest)
            return
        # Not ours (h2c, ...): the request was an ordinary one; parse what follows afresh.
        self.parser = httptools.HttpRequestParser(self)
        self.in_message = False
        if self.cycle is not None:
            self.cycle.end()
            self.pending += rest
        elif rest:
            self._feed(rest)

    def on_message_begin(self) -> None:
        self.in_message = True
        self.url, self.headers, self.head_bytes, self.body_size, self.head_fed = b"", [], 0, 0, 0
        self._arm(self.settings.header_timeout, self._header_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.settings.max_header_bytes:
            self.oversize = True
            raise ValueError("request head too large")   # stops the parser; answered 431 in _feed
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.head_bytes > self.settings.max_header_bytes:
            return
        self._disarm()
        if _content_length(self.headers) > self.settings.max_body_bytes:
            self.refuse(413, b"request body too large\n")
            return
        version = self.parser.get_http_version()
        keep_alive = self.parser.should_keep_alive()
        scope = self.server.scope(self, self.parser.get_method().decode("ascii"), self.url, version,
                                  self.headers)
        if scope is None:
            self.refuse(400, b"bad request target\n")
            return
        if self.parser.should_upgrade() and any(n == b"upgrade" and v.lower() == b"websocket"
                                                for n, v in self.headers) and self.server.websockets:
            self.upgrade = scope   # the parser raises HttpParserUpgrade next
            return
        expect = version == "1.1" and any(n == b"expect" and v.lower() == b"100-continue" for n, v in self.headers)
        self._run(Cycle(self, scope, keep_alive and not self.draining_close(), expect))

    def _run(self, cycle: Cycle) -> None:
        self.cycle = cycle
        self.started_at = time.monotonic()
        self._arm(self.settings.request_timeout, self._request_timeout)
        cycle.task = self.loop.create_task(self.server.run_app(cycle))
        self.server.busy.track(cycle, cycle.task)

    def resume_stream(self, scope: dict[str, Any], status: int, keep_alive: bool) -> None:
        """Continue a response another worker started and moved here (streammove.py)."""
        self._run(Cycle(self, scope, keep_alive, False, resumed=status))

    def on_body(self, body: bytes) -> None:
        if self.cycle is None:
            return
        self.body_size += len(body)
        if self.body_size > self.settings.max_body_bytes:
            self.refuse(413, b"request body too large\n")
            return
        self.cycle.body(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        if self.cycle is not None:
            self.cycle.end()

    # -- writing --

    def write(self, data: bytes) -> None:
        """Send `data` unless the connection is closing."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def writable(self) -> None:
        """Wait until the transport's buffer fell below its high-water mark."""
        if self.paused_writing and not self.closing:
            self._writable = self.loop.create_future()
            await self._writable

    def response_done(self, cycle: Cycle) -> None:
        """The app sent its last body: log, then read on, move or close."""
        self.server.log_request(self, cycle)
        if cycle.task is not None and cycle.task.done():
            self._after(cycle)
        # else: run_app calls `finished()` when the app returns

    def finished(self, cycle: Cycle) -> None:
        """The app returned (or failed, or timed out)."""
        if self.cycle is cycle:
            self._after(cycle)

    def _after(self, cycle: Cycle) -> None:
        if self.cycle is not cycle:
            return
        self.cycle = None
        self._disarm()
        if not cycle.finished or not cycle.keep_alive or self.in_message or self.closing:
            self.close()
            return
        self._arm(self.settings.keepalive_timeout, self._idle_timeout)
        if self.server.offer(self):
            return   # moved to another worker, with `pending`
        if self.pending:
            data, self.pending = self.pending, b""
            self.resume()
            self._feed(data)
        else:
            self.resume()

    def refuse(self, status: int, body: bytes) -> None:
        """Answer an error without the app, then close."""
        if self.closing:
            return
        cycle = self.cycle
        if cycle is not None and cycle.started:
            self.close()   # too late for a status: the client sees a short response
            return
        self.write(status_line(status) + self.server.date_header + b"content-type: text/plain\r\n"
                   b"content-length: %d\r\nconnection: close\r\n\r\n%b" % (len(body), body))
        self.server.log_error(self, status)
        self._linger()

    def _linger(self) -> None:
        """Half-close once the answer is written, drop what the client still sends, then close."""
        transport = self.transport
        if transport is None or not transport.can_write_eof():
            self.close()
            return
        self.close_soon()
        self.linger = LINGER_BYTES
        transport.write_eof()   # FIN after the queued answer; the client's EOF then closes us
        if self.paused_reading:
            self.paused_reading = False
            transport.resume_reading()
        self._arm(LINGER_SECONDS, transport.close)

    def close_soon(self) -> None:
        """Stop serving: no more parsing, the app's task cancelled."""
        self.closing = True
        self._disarm()
        if self.cycle is not None and self.cycle.task is not None and not self.cycle.task.done():
            self.cycle.task.cancel()

    def close(self) -> None:
        """Close once what is queued is written."""
        self.close_soon()
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        """Stop reading from the client."""
        if not self.paused_reading and self.transport is not None and not self.closing:
            self.paused_reading = True
            self.transport.pause_reading()

    def resume(self) -> None:
        """Read from the client again."""
        if self.paused_reading and self.transport is not None and not self.closing:
            self.paused_reading = False
            self.transport.resume_reading()

    # -- draining and moving --

    def idle(self) -> bool:
        """Return True between requests with nothing queued to write: the moment a connection can move."""
        return self.cycle is None and self._quiet()

    def movable(self) -> bool:
        """Return True if it can move now: idle, or a response that opted in is between two sends."""
        return (self.cycle is None or self.cycle.movable()) and self._quiet()

    def _quiet(self) -> bool:
        t = self.transport
        return (not self.in_message and not self.closing and t is not None and not t.is_closing()
                and t.get_write_buffer_size() == 0)

    def draining_close(self) -> bool:
        """Return True if the next response should say `Connection: close` (draining, no taker)."""
        return self.server.draining and (self.stay or not self.server.giving)

    def handoff_state(self) -> bytes | None:
        """Between two requests an HTTP/1.1 connection has no state but its unparsed bytes; a moving
        response has its scope and the app's position (None if the app's `on_move` failed)."""
        return b"" if self.cycle is None else self.cycle.handoff()

    def not_moved(self) -> None:
        """The hand-off failed: serve on here, and drain (Connection: close on the next answer)."""
        self.stay = True
        self.resume()

    def detach(self) -> tuple[int, bytes]:
        """Stop reading; return our socket's fd and the bytes read but not handled."""
        self.pause()
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        return int(sock.fileno()), self.pending

    def moved(self) -> None:
        """Another worker serves this connection now: drop ours without a word."""
        if self.cycle is not None:
            self.cycle.gone()
        self.closing = True
        self._disarm()
        if self.transport is not None:
            self.transport.abort()

    def became_websocket(self) -> None:
        """The transport now belongs to a WebSocket protocol: forget it here."""
        self.closing = True
        self._disarm()
        self.transport = None

    def drain_idle(self) -> None:
        """Draining without hand-off: close an idle keep-alive connection (after the grace period)."""
        if self.idle() and not self.pending:
            self.close()

    # -- timers --

    def _arm(self, delay: float, callback: Any) -> None:
        # A deadline the server's tick checks (WebServer.expire), not a loop timer: three timers
        # created and cancelled per request cost more than a sweep of the connections twice a second.
        self.deadline = self.loop.time() + delay
        self.timer = callback

    def _disarm(self) -> None:
        self.timer = None

    def expire(self, now: float) -> None:
        """Run the armed timeout if its deadline has passed."""
        if self.timer is not None and now >= self.deadline:
            callback, self.timer = self.timer, None
            callback()

    def _idle_timeout(self) -> None:
        if self.cycle is None and not self.in_message:
            self.close()

    def _header_timeout(self) -> None:
        if self.cycle is None:
            self.refuse(408, b"request header timeout\n")

    def _request_timeout(self) -> None:
        if self.cycle is not None:
            self.refuse(500, b"the application did not answer in time\n")


def _content_length(headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b"content-length":
            return int(value)   # llhttp has checked it: digits, only one
    return 0
