"""A WSGI (PEP 3333) app behind the ASGI server: each request runs in a thread of a pool.

Written here rather than taken from an adapter (a2wsgi) because it is small
and because the pool must be created in the worker, after the fork, never in
the template (threads do not survive a fork). The request body is read in
full before the app runs (the server's `max_body_bytes` bounds it); the
response streams: the thread queues each piece for the event loop, and waits
once more than MAX_QUEUED pieces are unsent, so a slow client holds back a
big response instead of filling memory.

Keep-alive hand-off works as for an ASGI app: the connection is idle between
requests whatever runs them.
"""

from __future__ import annotations

import asyncio
import io
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable
from urllib.parse import unquote_to_bytes

from upgraderd.apps import logline
from upgraderd.apps.asgi import settings

MAX_QUEUED = 16
Send = Callable[[dict[str, Any]], Any]


class WsgiApp:
    """An ASGI app that runs a WSGI callable in a thread pool."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.pool: ThreadPoolExecutor | None = None

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Any], send: Send) -> None:
        if scope["type"] != "http":
            return   # lifespan: a WSGI app has none (returning at once says "unsupported")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self.pool is None:   # in the worker, after the fork
            self.pool = ThreadPoolExecutor(settings.from_environment().wsgi_threads, "wsgi")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        room = threading.Semaphore(MAX_QUEUED)
        done = loop.run_in_executor(self.pool, self._run, environ(scope, bytes(body)), loop, queue, room)
        while True:
            item = await queue.get()
            room.release()
            if item is None:
                break
            await send(item)
        await done

    def _run(self, env: dict[str, Any], loop: asyncio.AbstractEventLoop,
             queue: asyncio.Queue[dict[str, Any] | None], room: threading.Semaphore) -> None:
        """In a pool thread: call the app, queue its response for the loop."""
        head: list[Any] = []

        def put(item: dict[str, Any] | None) -> None:
            room.acquire()
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            if head and exc_info is None:
                raise RuntimeError("start_response called twice without exc_info")
            head[:] = [int(status.split(" ", 1)[0]),
                       [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]]
            return lambda data: put({"type": "http.response.body", "body": bytes(data), "more_body": True})

        started = False
        try:
            result = self.app(env, start_response)
            try:
                for chunk in result:
                    if not started:
                        put({"type": "http.response.start", "status": head[0], "headers": head[1]})
                        started = True
                    if chunk:
                        put({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            if not started:
                put({"type": "http.response.start", "status": head[0], "headers": head[1]})
            put({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception as e:
            logline.log(f"upgraderd worker: the WSGI app failed: {type(e).__name__}: {e}", "ERROR")
            if not started:
                put({"type": "http.response.start", "status": 500,
                     "headers": [(b"content-type", b"text/plain"), (b"connection", b"close")]})
            put({"type": "http.response.body", "body": b"internal server error\n" if not started else b"",
                 "more_body": False})
        finally:
            put(None)


def environ(scope: dict[str, Any], body: bytes) -> dict[str, Any]:
    """Return the PEP 3333 environ of an ASGI http scope."""
    root = scope.get("root_path", "")
    path = unquote_to_bytes(scope["raw_path"]).decode("latin-1")
    if root and path.startswith(root):
        path = path[len(root):]
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client")
    env: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"], "SCRIPT_NAME": root, "PATH_INFO": path,
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": str(server[0]), "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}", "REMOTE_ADDR": client[0] if client else "",
        "REMOTE_PORT": str(client[1]) if client else "",
        "wsgi.version": (1, 0), "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
        "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
    }
    for name, value in scope["headers"]:
        key = name.decode("latin-1").upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            env[key] = value.decode("latin-1")
            continue
        key = "HTTP_" + key
        text = value.decode("latin-1")
        env[key] = env[key] + "," + text if key in env else text
    return env
