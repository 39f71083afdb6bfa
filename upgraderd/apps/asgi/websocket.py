"""WebSocket connections (ASGI websocket scope 2.4) on wsproto, after an HTTP/1.1 upgrade.

h1.py parses the handshake request; this module takes the transport over
(`transport.set_protocol`) and speaks the protocol through wsproto, a sans-IO
state machine. No extension is negotiated (wsproto offers none unless asked):
permessage-deflate with context takeover keeps compressor state that could not
move with a connection.

The ASGI side: `websocket.connect` first; `websocket.accept` (with a
subprotocol and headers), or `websocket.close` before it, which is a 403, or
the denial response extension (`websocket.http.response.start` and `.body`).
Then `websocket.receive` / `websocket.send` until `websocket.disconnect`.
Invalid UTF-8 in a text message gets close code 1007 (wsproto's verdict), a
message over `websocket_max_message` 1009.

At a reload, an app that opted in (wsmove.py) has its WebSocket moved to the
ACTIVE generation at a message boundary, with the state it saved. Any other
WebSocket is closed with 1012 (Service Restart) by the draining worker; it
drains only once its successor is ACTIVE, so a client that reconnects at once
lands on the new generation, and the app gets `websocket.disconnect` with
code 1012. Never an abnormal close (1006): the close frame goes out before
the TCP connection ends.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any, cast

from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Message, Ping, RejectConnection,
                            RejectData, Request, TextMessage)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from upgraderd.apps import logline
from upgraderd.apps.asgi import wsmove
from upgraderd.apps.asgi.wsframes import FrameScanner

if TYPE_CHECKING:
    from upgraderd.apps.asgi.roles import WebHost

SERVICE_RESTART = 1012
CLOSE_WAIT = 2.0   # seconds we wait for the client's close frame before closing the TCP connection


class WebSocketProtocol(asyncio.Protocol):
    """One WebSocket connection between a client and the ASGI app."""

    def __init__(self, server: WebHost, scope: dict[str, Any], listener: str,
                 transport: asyncio.Transport | None = None, resumed: bool = False) -> None:
        self.server, self.scope, self.listener = server, scope, listener
        self.transport = cast(asyncio.Transport, transport)   # None until connection_made when adopted
        self.loop = server.loop
        self.resumed = resumed       # moved here from an older worker: no handshake
        self.ws: WSConnection | Connection = Connection(ConnectionType.SERVER) if resumed \
            else WSConnection(ConnectionType.SERVER)
        self.inbox: deque[dict[str, Any]] = deque([{"type": "websocket.connect"}])
        self.waiter: asyncio.Future[None] | None = None
        self.accepted = resumed
        self.subprotocol: str | None = None
        self.closed = False          # our close frame went out, or the client's arrived
        self.gone = False            # the TCP connection is over
        self.moved_away = False      # handed to another worker: the app's sends are dropped
        self.parts: list[Any] = []   # the fragments of the message being received
        self.frames = FrameScanner()  # where the bytes given to wsproto end: at a message boundary or not
        self.size = 0
        self.denial: bool = False    # a denial response is being sent
        self.task: asyncio.Task[None] | None = None

    def start(self, request: dict[str, Any], rest: bytes) -> None:
        """Take the upgrade request (already parsed) and run the app."""
        assert isinstance(self.ws, WSConnection)
        self.ws.initiate_upgrade_connection(list(request["headers"]), request["raw_path"])
        for event in self.ws.events():
            assert isinstance(event, Request)
        if self.server.moves.enabled:
            self.scope["extensions"][wsmove.EXTENSION] = {"resumed": None, "on_move": None}
        self.server.websockets_open.add(self)
        self.task = self.loop.create_task(self._run())
        if rest:
            self.data_received(rest)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """A WebSocket moved here: serve it from where it was."""
        self.transport = cast(asyncio.Transport, transport)
        self.server.websockets_open.add(self)
        self.task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            await self.server.app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            pass
        except Exception as e:
            logline.log(f"upgraderd worker: the app failed on a WebSocket {self.scope['path']}: {type(e).__name__}: {e}", "ERROR")
        if not self.accepted and not self.denial and not self.gone:
            self._reject(500 if not self.closed else 403)
        elif not self.closed:
            self._close(1011 if not self.gone else 1000, "")

    # -- asyncio.Protocol (after the hand-over of the transport) --

    def data_received(self, data: bytes) -> None:
        self.frames.feed(data)
        try:
            self.ws.receive_data(data)
        except RemoteProtocolError:
            self._close(1002, "protocol error")
            return
        for event in self.ws.events():
            if isinstance(event, Message):
                self._message(event)
            elif isinstance(event, Ping):
                self._write(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self._deliver({"type": "websocket.disconnect", "code": event.code, "reason": event.reason or ""})
                if not self.closed:
                    self.closed = True
                    try:
                        self._write(self.ws.send(event.response()))
                    except LocalProtocolError:
                        pass
                self.transport.close()

    def _message(self, event: Message[Any]) -> None:
        self.parts.append(event.data)
        self.size += len(event.data)
        if self.size > self.server.settings.websocket_max_message:
            self._deliver({"type": "websocket.disconnect", "code": 1009, "reason": ""})
            self._close(1009, "message too big")
            return
        if not event.message_finished:
            return
        if isinstance(event, TextMessage):
            self._deliver({"type": "websocket.receive", "text": "".join(self.parts)})
        elif isinstance(event, BytesMessage):
            self._deliver({"type": "websocket.receive", "bytes": b"".join(self.parts)})
        self.parts, self.size = [], 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        if not self.closed:
            self._deliver({"type": "websocket.disconnect", "code": 1006, "reason": ""})
        if self in self.server.websockets_open:
            self.server.websockets_open.discard(self)
            self.server.detached_websocket(self)

    def _deliver(self, message: dict[str, Any]) -> None:
        self.inbox.append(message)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # -- the app's side --

    async def receive(self) -> dict[str, Any]:
        """Return the next event for the app (ASGI `receive`)."""
        while not self.inbox:
            self.waiter = self.loop.create_future()
            await self.waiter
        message = self.inbox.popleft()
        if message["type"] == "websocket.disconnect":
            self.inbox.appendleft(message)   # it stays the answer from now on
        return message

    async def send(self, message: dict[str, Any]) -> None:
        """Act on an event from the app (ASGI `send`)."""
        kind = message.get("type")
        if self.moved_away:
            return   # another worker serves the client now (wsmove.py)
        if self.gone or (self.closed and kind != "websocket.close"):
            raise OSError("the WebSocket is closed")
        if kind == "websocket.accept" and self.resumed and self.inbox_connect_taken():
            return   # a moved connection: the handshake happened on the old worker
        if kind == "websocket.accept" and not self.accepted and not self.denial:
            self.accepted = True
            self.subprotocol = message.get("subprotocol")
            headers = [(bytes(n), bytes(v)) for n, v in message.get("headers") or []]
            self._write(self.ws.send(AcceptConnection(subprotocol=message.get("subprotocol"),
                                                      extra_headers=headers)))
        elif kind == "websocket.send" and self.accepted:
            text, data = message.get("text"), message.get("bytes")
            self._write(self.ws.send(TextMessage(data=text) if text is not None else BytesMessage(data=data or b"")))
        elif kind == "websocket.close":
            if self.accepted:
                self._close(int(message.get("code", 1000)), str(message.get("reason") or ""))
            elif not self.denial:
                self.closed = True
                self._reject(403)
        elif kind == "websocket.http.response.start" and not self.accepted and not self.denial:
            self.denial = True
            headers = [(bytes(n), bytes(v)) for n, v in message.get("headers") or []]
            self._write(self.ws.send(RejectConnection(status_code=int(message["status"]), headers=headers,
                                                      has_body=True)))
        elif kind == "websocket.http.response.body" and self.denial:
            more = bool(message.get("more_body", False))
            self._write(self.ws.send(RejectData(data=bytes(message.get("body", b"")), body_finished=not more)))
            if not more:
                self.closed = True
                self.transport.close()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on a WebSocket in this state")

    def inbox_connect_taken(self) -> bool:
        """Return True once the app has read `websocket.connect` (a resumed app accepts after it)."""
        return not self.inbox or self.inbox[0]["type"] != "websocket.connect"

    # -- moving (wsmove.py) --

    def opted_in(self) -> bool:
        """Return True if the app gave an `on_move` (wsmove.py) and accepted."""
        ext = self.scope["extensions"].get(wsmove.EXTENSION)
        return self.accepted and not self.denial and ext is not None and callable(ext.get("on_move"))

    def idle(self) -> bool:
        """Return True if the app opted in and the connection is at a message boundary."""
        # The app waits in receive() with nothing queued: it has done all it does for the last message.
        waiting = not self.inbox and self.waiter is not None and not self.waiter.done()
        return (self.opted_in() and waiting and not self.closed and not self.gone and not self.parts
                and self.frames.at_boundary() and self.transport.get_write_buffer_size() == 0)

    def handoff_state(self) -> bytes | None:
        """Ask the app for its state; return what moves (None: it failed, close with 1012 instead)."""
        try:
            saved = self.scope["extensions"][wsmove.EXTENSION]["on_move"]()
            return wsmove.encode(self.scope, self.subprotocol, bytes(saved))
        except Exception as e:
            logline.log(f"upgraderd worker: a WebSocket's on_move failed: {type(e).__name__}: {e}", "ERROR")
            return None

    def detach(self) -> tuple[int, bytes]:
        """Stop reading; return our socket's fd and the bytes read but not parsed (none at a boundary)."""
        self.transport.pause_reading()
        return int(self.transport.get_extra_info("socket").fileno()), b""

    def moved(self) -> None:
        """Another worker serves the client now: end the app's side here, silently on the wire."""
        self.moved_away = self.closed = True
        self._deliver({"type": "websocket.disconnect", "code": SERVICE_RESTART, "reason": "moved"})
        self.transport.abort()

    def not_moved(self) -> None:
        """The hand-off failed: serve on, and close with 1012 (the successor is ACTIVE)."""
        self.transport.resume_reading()
        self.restart()

    # -- closing --

    def restart(self) -> None:
        """The worker drains (its successor is ACTIVE): close with 1012 so that the client reconnects there."""
        if self.accepted and not self.closed:
            self._deliver({"type": "websocket.disconnect", "code": SERVICE_RESTART, "reason": "service restart"})
            self._close(SERVICE_RESTART, "service restart")

    def _close(self, code: int, reason: str) -> None:
        if self.closed or self.gone:
            return
        self.closed = True
        try:
            self._write(self.ws.send(CloseConnection(code=code, reason=reason)))
        except LocalProtocolError:
            self.transport.close()
            return
        # The client answers with its close frame (data_received closes then); a silent one is cut here.
        self.loop.call_later(CLOSE_WAIT, self.transport.close)

    def _reject(self, status: int) -> None:
        self._write(self.ws.send(RejectConnection(status_code=status)))
        self.transport.close()

    def _write(self, data: bytes) -> None:
        if not self.gone and not self.transport.is_closing():
            self.transport.write(data)
