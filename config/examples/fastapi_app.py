"""A FastAPI app, unchanged, served by upgraderd (config/examples/fastapi.yaml).

Nothing in it knows about upgraderd: JSON endpoints, a streaming endpoint and a
WebSocket endpoint, as any FastAPI app has. Answers name the generation that
served them (upgraderd passes UPGRADERD_GENERATION), so a client can watch a
reload; /seq/... also echoes the path and the client's port, which
tests/support/keepalive.py checks to prove a connection kept its TCP connection.

    .venv/bin/pip install fastapi '.[asgi]' && .venv/bin/upgraderd run -c config/examples/fastapi.yaml
"""

from __future__ import annotations

import asyncio
import os
from typing import AsyncIterator

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse, StreamingResponse

app = FastAPI()


def generation() -> str:
    return os.environ.get("UPGRADERD_GENERATION", "0")


@app.get("/")
async def hello() -> dict[str, str]:
    """JSON hello world (what bench/asgi.py measures)."""
    return {"hello": "world"}


@app.get("/items/{item_id}")
async def item(item_id: int, q: str | None = None) -> dict[str, object]:
    """JSON with a path and a query parameter."""
    return {"item_id": item_id, "q": q, "generation": generation()}


@app.post("/items")
async def create(payload: dict[str, object]) -> dict[str, object]:
    """JSON in, JSON out."""
    return {"created": payload, "generation": generation()}


@app.get("/seq/{client}/{n}", response_class=PlainTextResponse)
async def seq(client: int, n: int, request: Request) -> str:
    """Who answered, to which request and which client port (the keep-alive test's check)."""
    peer = request.client.port if request.client else 0
    return (f"generation={generation()} slot={os.environ.get('UPGRADERD_SLOT', '0')} pid={os.getpid()} "
            f"server=fastapi peer={peer} path=/seq/{client}/{n}\n")


@app.get("/stream")
async def stream(parts: int = 5) -> StreamingResponse:
    """A streaming answer (chunked), one line every 10 ms."""
    async def lines() -> AsyncIterator[bytes]:
        for i in range(parts):
            yield f"part {i} of {parts} from generation {generation()}\n".encode()
            await asyncio.sleep(0.01)
    return StreamingResponse(lines(), media_type="text/plain")


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    """Echo every text message, prefixed with the generation."""
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"{generation()}:{text}")
    except WebSocketDisconnect:
        pass
