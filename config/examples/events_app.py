"""Server-sent events that keep flowing across reloads (config/examples/events.yaml).

A FastAPI app with two event streams, each `id: N` then `data: ...` every
`every` seconds, up to `count` events:

- `/events` opts in to upgraderd's `upgraderd.http.move` extension
  (docs/workers.md, "Your ASGI or WSGI app"): at a reload the stream moves to
  the new generation on the same connection, and carries on from its
  position (the next event's number, which the app saves);
- `/ticks` does not: at a reload it finishes in the old worker, within
  drain.timeout.

Under any other ASGI server the extension is absent and `/events` is a plain
stream. Each event names the generation and the pid that sent it.

    .venv/bin/pip install fastapi '.[asgi]' && .venv/bin/upgraderd run -c config/examples/events.yaml
    curl -N 'http://127.0.0.1:8004/events?count=1000'
"""

from __future__ import annotations

import asyncio
import os
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

app = FastAPI()
MOVE = "upgraderd.http.move"


def event(n: int) -> bytes:
    generation = os.environ.get("UPGRADERD_GENERATION", "0")
    return f"id: {n}\ndata: event {n} generation={generation} pid={os.getpid()}\n\n".encode()


async def stream(position: list[int], count: int, every: float) -> AsyncIterator[bytes]:
    while position[0] < count:
        n = position[0]
        position[0] = n + 1   # counted as sent before the send: save() never runs inside one
        yield event(n)
        await asyncio.sleep(every)


@app.get("/events")
async def events(request: Request, count: int = 100, every: float = 0.02) -> StreamingResponse:
    """Events 0..count-1 that move with the connection at a reload (the opt-in)."""
    position = [0]
    move = request.scope.get("extensions", {}).get(MOVE)
    if move is not None:
        if move["resumed"] is not None:
            position[0] = int(move["resumed"])   # moved here: carry on where the old worker stopped
        move["on_move"] = lambda: str(position[0]).encode()
    return StreamingResponse(stream(position, count, every), media_type="text/event-stream")


@app.get("/ticks")
async def ticks(count: int = 100, every: float = 0.02) -> StreamingResponse:
    """The same stream without the opt-in: it finishes where it started."""
    return StreamingResponse(stream([0], count, every), media_type="text/event-stream")
