"""A small ASGI app for the uvicorn example (config/examples/uvicorn.yaml) and asgi.yaml.

Every answer names the generation, slot and pid that served it, so a client
can see a reload take effect, and echoes the client's port and the request
path, so a client can check that each answer is to its own request.
"""

from __future__ import annotations

import os
from typing import Any, Awaitable, Callable

VERSION = os.environ.get("APP_VERSION", "1")
SERVER = os.environ.get("APP_SERVER", "uvicorn")   # `upgraderd` when served as `app: asgi:asgi_app:app`


async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
              send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """Answer every HTTP request with 200 and who served it."""
    if scope["type"] != "http":
        return
    body = (f"generation={os.environ.get('UPGRADERD_GENERATION', '?')} "
            f"slot={os.environ.get('UPGRADERD_SLOT', '?')} pid={os.getpid()} "
            f"server={SERVER} version={VERSION} peer={(scope.get('client') or ('', 0))[1]} "
            f"path={scope['path']}\n").encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
