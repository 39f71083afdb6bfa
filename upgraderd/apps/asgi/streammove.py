"""The opt-in ASGI extension that moves a streaming HTTP response (server-sent events...) to the next generation.

Every HTTP request's scope carries, when hand-off is on:

    ext = scope["extensions"]["upgraderd.http.move"]
    ext["resumed"]    # None on a new request; on a moved response, the bytes the old worker's app saved
    ext["on_move"] = save   # the app opts in: save() -> bytes, its position in the stream

At a reload, the draining worker moves a response that opted in as soon as
it is between two sends: the response started, chunked (HTTP/1.1 without a
Content-Length: what a stream of unknown length is), the request body all
received and read, nothing queued to write and the app not waiting in
`send()`. It calls `save()`, then hands the socket, the request's scope and
those bytes to a worker of the ACTIVE generation. The old app then receives
`http.disconnect` and its sends raise OSError, as after a client's
disconnect. The new worker runs the app again with the same scope (method,
path, query, headers, client), `ext["resumed"]` set to the saved bytes and
an empty request body; the response is already started, so the app's
`http.response.start` writes nothing and its bodies continue the same
chunked response on the same connection. After its last body the connection
is an ordinary keep-alive one of the new worker. The client notices nothing.

The position must count everything the app passed to `send()`: each `send()`
returns once its bytes are handed to the socket, and `save()` is never
called while a `send()` is in progress. `save()` runs in the event loop and
must not block; if the hand-off then fails, the stream goes on in the old
worker (to finish within drain.timeout), so `save()` must not stop it.

What does not move: a response with a Content-Length, an HTTP/1.0 one, one
still reading its request body, and one whose app did not set `on_move`:
those finish in the old worker, within drain.timeout. The request body is
not moved: what the app needs of it belongs in the saved bytes.
"""

from __future__ import annotations

import json
from typing import Any

EXTENSION = "upgraderd.http.move"
MAGIC = b"upgraderd-http/1\n"
_TEXT = ("method", "path", "root_path", "scheme", "http_version")
_BYTES = ("raw_path", "query_string")


def extension() -> dict[str, Any]:
    """Return the extension's entry of a new request's scope."""
    return {"resumed": None, "on_move": None}


def encode(scope: dict[str, Any], status: int, keep_alive: bool, saved: bytes) -> bytes:
    """Return the hand-off state of a moving response: a JSON line of its scope, then the app's bytes."""
    doc: dict[str, Any] = {k: scope.get(k) for k in _TEXT}
    doc.update({k: bytes(scope.get(k, b"")).decode("latin-1") for k in _BYTES})
    doc["headers"] = [[bytes(n).decode("latin-1"), bytes(v).decode("latin-1")] for n, v in scope["headers"]]
    doc.update(client=scope.get("client"), server=scope.get("server"), status=status, keep_alive=keep_alive)
    return MAGIC + json.dumps(doc, separators=(",", ":")).encode() + b"\n" + saved


def is_stream(state: bytes) -> bool:
    """Return True if a hand-off state is a moving response's."""
    return state.startswith(MAGIC)


def decode(state: bytes, base: dict[str, Any]) -> tuple[dict[str, Any], int, bool]:
    """Return the resumed scope (the server's `base` fields plus the moved ones), its status and keep-alive.

    Raises ValueError if the state is not a well-formed moving response's.
    """
    if not is_stream(state):
        raise ValueError("not a moving response")
    line, _, saved = state[len(MAGIC):].partition(b"\n")
    doc = json.loads(line)
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in _TEXT):
        raise ValueError("malformed moving response")
    scope = dict(base)
    scope.update({k: doc[k] for k in _TEXT})
    scope.update({k: str(doc.get(k, "")).encode("latin-1") for k in _BYTES})
    scope["headers"] = [(str(n).encode("latin-1"), str(v).encode("latin-1")) for n, v in doc.get("headers", [])]
    scope["client"] = tuple(doc["client"]) if doc.get("client") else None
    scope["server"] = tuple(doc["server"]) if doc.get("server") else None
    scope["type"] = "http"
    scope["extensions"] = {EXTENSION: {"resumed": saved, "on_move": None}}
    return scope, int(doc.get("status", 200)), bool(doc.get("keep_alive", True))
