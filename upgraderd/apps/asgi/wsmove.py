"""The opt-in ASGI extension that moves a WebSocket to the next generation with the app's state.

An accepted WebSocket's scope carries, when hand-off is on:

    ext = scope["extensions"]["upgraderd.websocket.move"]
    ext["resumed"]    # None on a new connection; on a moved one, the bytes the old worker's app saved
    ext["on_move"] = save   # the app opts in: save() -> bytes, called when the connection moves

At a reload, the draining worker calls `save()` of each WebSocket that opted in,
at a message boundary (no message half received, the app back in `receive()`
with no event queued for it, nothing queued to send),
then hands the socket, the scope and those bytes to a worker of the ACTIVE
generation. The old app then receives `websocket.disconnect` with code 1012
and reason "moved" (it must not send on that connection any more: such sends
are dropped), and the new worker runs the app again with the same scope,
`ext["resumed"]` set to the saved bytes: its `websocket.accept` sends nothing
(the handshake happened long ago), and the client notices nothing. An app
that does not opt in gets close code 1012 instead.

What moves: wsproto's protocol state at a message boundary is fixed (OPEN,
no fragment pending, no extension), so it is rebuilt as a fresh
`wsproto.connection.Connection`; the boundary is known from upgraderd's own
scan of the frame headers it feeds wsproto (wsframes.py), not from wsproto's
internals; the scope goes as JSON (bytes as latin-1);
bytes the old worker read but had not parsed move as unparsed bytes.
`save()` runs in the event loop and must not block. Sends that another task of
the app makes after `save()` returned are dropped: what the app still owes the
client belongs in the state. Its result is bounded by
the hand-off wire format (upgraderd/worker/wire.py).
"""

from __future__ import annotations

import json
from typing import Any

EXTENSION = "upgraderd.websocket.move"
MAGIC = b"upgraderd-ws/1\n"
_BYTES = ("raw_path", "query_string")


def encode(scope: dict[str, Any], subprotocol: str | None, saved: bytes) -> bytes:
    """Return the hand-off state of a WebSocket: a JSON line of its scope, then the app's bytes."""
    doc = {k: v for k, v in scope.items() if k in ("path", "root_path", "scheme", "http_version", "subprotocols",
                                                   "client", "server")}
    for k in _BYTES:
        doc[k] = bytes(scope.get(k, b"")).decode("latin-1")
    doc["headers"] = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]]
    doc["subprotocol"] = subprotocol
    return MAGIC + json.dumps(doc, separators=(",", ":")).encode() + b"\n" + saved


def is_websocket(state: bytes) -> bool:
    """Return True if a hand-off state is a WebSocket's."""
    return state.startswith(MAGIC)


def decode(state: bytes, base: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Return the resumed scope (the server's `base` fields plus the moved ones) and the subprotocol.

    Raises ValueError if the state is not a WebSocket's.
    """
    if not is_websocket(state):
        raise ValueError("not a WebSocket hand-off")
    line, _, saved = state[len(MAGIC):].partition(b"\n")
    doc = json.loads(line)
    if not isinstance(doc, dict):
        raise ValueError("malformed WebSocket hand-off")
    scope = dict(base)
    scope.update({k: doc[k] for k in ("path", "root_path", "scheme", "http_version", "subprotocols") if k in doc})
    scope["client"] = tuple(doc["client"]) if doc.get("client") else None
    scope["server"] = tuple(doc["server"]) if doc.get("server") else None
    for k in _BYTES:
        scope[k] = str(doc.get(k, "")).encode("latin-1")
    scope["headers"] = [(str(n).encode("latin-1"), str(v).encode("latin-1")) for n, v in doc.get("headers", [])]
    scope["type"] = "websocket"
    scope["extensions"] = {"websocket.http.response": {}, EXTENSION: {"resumed": saved, "on_move": None}}
    return scope, doc.get("subprotocol")

