"""A FastAPI chat whose users keep their names, rooms and places across reloads (config/examples/chat.yaml).

It opts in to upgraderd's WebSocket move (docs/workers.md, section 12): it gives
`on_move`, which returns the user's state as bytes, and reads `resumed` when a
connection arrives from an older worker. The client notices nothing at a
reload: same TCP connection, no close, no lost or repeated message.

    ws://127.0.0.1:8003/chat/{room}?name=alice   send text; each message is
    delivered to the room's members on this worker as "room name n: text",
    n counting the sender's messages, and acknowledged to the sender with the
    generation that served it.

Rooms live in each worker's memory, so members see the messages of members
served by the same worker; across workers a real chat relays through a shared
bus (Redis, Postgres LISTEN), and that does not change at a reload.
Without upgraderd (uvicorn) the extension is absent and the app works the same,
minus the move.
"""

from __future__ import annotations

import json
import os
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()
rooms: dict[str, set[WebSocket]] = {}
MOVE = "upgraderd.websocket.move"


@app.websocket("/chat/{room}")
async def chat(websocket: WebSocket, room: str, name: str = "anonymous") -> None:
    """One member of a room."""
    move: dict[str, Any] | None = websocket.scope.get("extensions", {}).get(MOVE)
    user = {"name": name, "room": room, "sent": 0}
    if move is not None:
        if move["resumed"]:
            user = json.loads(move["resumed"])   # moved from an older worker: carry on
        move["on_move"] = lambda: json.dumps(user).encode()
    await websocket.accept()
    members = rooms.setdefault(str(user["room"]), set())
    members.add(websocket)
    generation = os.environ.get("UPGRADERD_GENERATION", "0")
    try:
        while True:
            text = await websocket.receive_text()
            user["sent"] = int(user["sent"]) + 1
            line = f"{user['room']} {user['name']} {user['sent']}: {text}"
            for member in list(members):
                if member is not websocket:
                    try:
                        await member.send_text(line)
                    except (RuntimeError, OSError, WebSocketDisconnect):
                        members.discard(member)   # that member left (or is leaving): not this sender's failure
            await websocket.send_text(f"ack {user['sent']} generation={generation}")
    except WebSocketDisconnect:
        pass
    finally:
        members.discard(websocket)
