"""One HTTP request as the ASGI app sees it: the scope, `receive()` and `send()`.

The connection (h1.py) feeds the request body in with `body()` and `end()`;
the app's `send()` events become bytes on the transport. A cycle never
touches the parser: it asks the connection to read more (`resume`) when the
app waits for body, and the connection pauses reading while the app lags, so
an app that never reads its body holds at most HIGH_WATER bytes of it.

Invariants:
- A response is started once and ends once; an event out of that order
  raises RuntimeError in the app, as the ASGI spec asks.
- `Content-Length` given by the app is honoured; without one the body is
  sent chunked (HTTP/1.1) or until close (HTTP/1.0).
- After the response ends, `receive()` answers `http.disconnect` once the
  client has gone, and blocks until then (the spec's reading).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

from upgraderd.apps import logline
from upgraderd.apps.asgi.streammove import EXTENSION, encode

if TYPE_CHECKING:
    from upgraderd.apps.asgi.roles import HttpConn

HIGH_WATER = 65536
STATUS_TEXT: dict[int, bytes] = {}


def status_line(status: int) -> bytes:
    """Return `HTTP/1.1 <status> <reason>\\r\\n`, cached per status."""
    line = STATUS_TEXT.get(status)
    if line is None:
        from http import HTTPStatus
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        line = STATUS_TEXT[status] = f"HTTP/1.1 {status} {reason}\r\n".encode()
    return line


class Cycle:
    """The ASGI receive/send pair of one request."""

    __slots__ = ("conn", "scope", "chunks", "buffered", "more_body", "waiter", "started", "finished",
                 "status", "chunked", "length_left", "keep_alive", "disconnected", "head_only",
                 "expect_continue", "sent_bytes", "task", "body_sent", "resumed", "in_send", "moved", "cut_off")

    def __init__(self, conn: HttpConn, scope: dict[str, Any], keep_alive: bool, expect_continue: bool,
                 resumed: int = 0) -> None:
        self.conn = conn
        self.scope = scope
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.more_body = True
        self.body_sent = False   # the app has had the last body event: only a disconnect is left to tell it
        self.waiter: asyncio.Future[None] | None = None
        self.started = False
        self.finished = False
        self.status = 0
        self.chunked = False
        self.length_left: int | None = None
        self.keep_alive = keep_alive
        self.disconnected = False
        self.head_only = scope["method"] == "HEAD"
        self.expect_continue = expect_continue
        self.sent_bytes = 0
        self.task: asyncio.Task[None] | None = None
        # A response moved here from another worker (streammove.py): its status, its head long sent.
        self.resumed = resumed
        self.in_send = False   # the app waits in send() for room to write: not a moment to move
        self.moved = False
        self.cut_off = False   # the server ended the response at the drain deadline (cut)
        if resumed:
            self.more_body = False   # the request body stayed behind: the app gets an empty one

    # -- fed by the connection --

    def body(self, data: bytes) -> None:
        """Queue a piece of the request body."""
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER:
            self.conn.pause()
        self._wake()

    def end(self) -> None:
        """The request body is complete."""
        self.more_body = False
        self._wake()

    def disconnect(self) -> None:
        """The client has gone (or the connection is being closed)."""
        self.disconnected = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # -- the app's side --

    async def receive(self) -> dict[str, Any]:
        """Return the next request event (ASGI `receive`)."""
        if self.expect_continue and not self.started:
            self.expect_continue = False
            self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while not (self.chunks or not self.more_body or self.disconnected):
            self.conn.resume()
            self.waiter = self.conn.loop.create_future()
            await self.waiter
            self.waiter = None
        if self.disconnected or self.body_sent or (self.finished and not self.chunks and not self.more_body):
            # Apps such as Django listen for a disconnect while the view runs: that receive()
            # waits here; never a second `http.request` after the last one.
            while not self.disconnected:
                self.waiter = self.conn.loop.create_future()
                await self.waiter   # the spec: after the response, disconnect is reported when it happens
            return {"type": "http.disconnect"}
        body = b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        more = self.more_body
        if more:
            self.conn.resume()
        else:
            self.body_sent = True
        return {"type": "http.request", "body": body, "more_body": more}

    async def send(self, message: dict[str, Any]) -> None:
        """Write a response event (ASGI `send`)."""
        kind = message.get("type")
        if self.cut_off:   # the spec's "send on a closed connection": an OSError, as for a client gone
            raise OSError("the response was ended at the worker's drain deadline")
        if self.disconnected and not self.finished:
            raise OSError("the client disconnected")
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self._start(int(message["status"]), message.get("headers") or [])
        elif kind == "http.response.body":
            if not self.started or self.finished:
                raise RuntimeError("http.response.body before http.response.start or after the last body")
            self._body(bytes(message.get("body", b"")), bool(message.get("more_body", False)))
            if self.conn.paused_writing:
                self.in_send = True
                try:
                    await self.conn.writable()
                finally:
                    self.in_send = False
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} in an HTTP request")

    def _start(self, status: int, headers: Any) -> None:
        self.started = True
        self.status = status
        if self.resumed:   # the client has had this head from the worker the response moved from
            self.status, self.chunked = self.resumed, True
            return
        conn = self.conn
        out = [status_line(status), conn.server.date_header]
        for name, value in headers:
            lname = bytes(name).lower()
            if lname == b"content-length":
                self.length_left = int(value)
            elif lname == b"connection" and bytes(value).lower() == b"close":
                self.keep_alive = False
            elif lname == b"transfer-encoding":
                continue  # ours to choose
            out += [bytes(name), b": ", bytes(value), b"\r\n"]
        if conn.draining_close():
            self.keep_alive = False   # the last resort: no taker for this connection
        bodyless = self.head_only or status in (204, 304) or status < 200
        if self.length_left is None and not bodyless:
            if self.scope["http_version"] == "1.1":
                self.chunked = True
                out.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False
        if bodyless:
            self.length_left = 0 if self.length_left is None or self.head_only else self.length_left
        if not self.keep_alive:
            out.append(b"connection: close\r\n")
        elif self.scope["http_version"] == "1.0":
            out.append(b"connection: keep-alive\r\n")
        out.append(b"\r\n")
        conn.head = b"".join(out)   # sent with the first body, in one write

    def _body(self, body: bytes, more: bool) -> None:
        conn = self.conn
        head, conn.head = conn.head, b""
        if self.head_only:
            body = b""
        elif self.chunked:
            body = (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + (b"" if more else b"0\r\n\r\n")
        elif self.length_left is not None:
            if len(body) > self.length_left:
                raise RuntimeError("response body longer than its Content-Length")
            self.length_left -= len(body)
        self.sent_bytes += len(body)
        if head or body:
            conn.write(head + body if head else body)
        if not more:
            if self.length_left:
                self.keep_alive = False   # shorter than announced: the client cannot find the next response
            self.finished = True
            conn.response_done(self)

    def cut(self) -> None:
        """The drain deadline is near: end a chunked response in progress properly (the last chunk)."""
        if self.started and self.chunked and not self.finished and not self.moved:
            self._body(b"", False)
            self.cut_off = True   # the app's next send raises OSError, and its receive says disconnect
            self.disconnect()

    # -- moving a stream (streammove.py) --

    def movable(self) -> bool:
        """Return True if the response opted in to move and is between two sends."""
        ext = self.scope["extensions"].get(EXTENSION)
        return (self.chunked and self.started and not self.finished and not self.more_body and not self.chunks
                and not self.in_send and not self.disconnected and not self.moved and ext is not None
                and callable(ext.get("on_move")))

    def handoff(self) -> bytes | None:
        """Return what moves with the response: its scope and the app's position (None: the app failed)."""
        try:
            saved = self.scope["extensions"][EXTENSION]["on_move"]()
        except Exception as e:
            logline.log(f"upgraderd worker: the app's on_move failed: {type(e).__name__}: {e}", "ERROR")
            return None
        if not isinstance(saved, (bytes, bytearray)):
            return None
        return encode(self.scope, self.status, self.keep_alive, bytes(saved))

    def gone(self) -> None:
        """The response moved: the app here sees a disconnect, and its sends fail."""
        self.moved = True
        self.disconnect()
