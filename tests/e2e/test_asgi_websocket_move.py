"""WebSockets that move to the new generation with the app's state (config/examples/chat_app.py).

Clients of the independent `websockets` library chat through HUPs: none is
closed, every message is acknowledged once and in order (the app's per-user
count, which moves with the connection, carries on), and the acknowledgements
come from the new generation after each reload.
"""

from __future__ import annotations

import asyncio
import re

import pytest
import websockets

from tests.e2e.test_asgi import web_config
from tests.support.upgraderd_proc import Daemon, free_port

pytestmark = pytest.mark.e2e

CLIENTS = 100
RELOADS = 3


async def member(port: int, i: int, stop: asyncio.Event, seen: dict[int, list[int]]) -> tuple[int, list[str]]:
    """Chat until `stop`; return the local port and the generations that acknowledged."""
    async with websockets.connect(f"ws://127.0.0.1:{port}/chat/room{i % 7}?name=user{i}", ping_interval=None,
                                  compression=None) as ws:
        local = ws.transport.get_extra_info("sockname")[1]
        gens: list[str] = []
        n = 0
        while not stop.is_set():
            n += 1
            await ws.send(f"hello {n}")
            while True:   # room messages of others may come first
                text = await asyncio.wait_for(ws.recv(), 10)
                if text.startswith("ack "):
                    break
            count, gen = re.fullmatch(r"ack (\d+) generation=(\d+)", text).groups()   # type: ignore[union-attr]
            seen.setdefault(i, []).append(int(count))
            gens.append(gen)
            await asyncio.sleep(0.05)
        assert local == ws.transport.get_extra_info("sockname")[1]
        return local, gens


def test_chat_members_keep_their_connections_and_state_through_reloads(tmp_path):
    port = free_port()
    with Daemon(tmp_path, web_config("chat", port)).start() as d:
        async def run() -> list[tuple[int, list[str]]]:
            stop = asyncio.Event()
            seen: dict[int, list[int]] = {}
            tasks = [asyncio.create_task(member(port, i, stop, seen)) for i in range(CLIENTS)]
            while len(seen) < CLIENTS:
                await asyncio.sleep(0.1)
            for gen in range(2, 2 + RELOADS):
                await asyncio.to_thread(d.reload_to, gen)
                await asyncio.to_thread(d.wait_log, rf"generation {gen - 1} DRAINING -> RETIRED", 1, 30)
                marks = {i: len(v) for i, v in seen.items()}
                deadline = asyncio.get_running_loop().time() + 30
                while any(len(seen[i]) < marks[i] + 2 for i in seen):
                    failed = [t for t in tasks if t.done()]
                    if failed:
                        await failed[0]   # raises what ended a client early
                    assert asyncio.get_running_loop().time() < deadline, "clients stalled after a reload"
                    await asyncio.sleep(0.1)
            stop.set()
            results = await asyncio.gather(*tasks)
            for i, counts in seen.items():
                assert counts == list(range(1, len(counts) + 1)), f"client {i}: lost or repeated {counts}"
            return results
        results = asyncio.run(run())
        log = d.log()
    assert len(results) == CLIENTS
    for _local, gens in results:
        assert gens[-1] == str(1 + RELOADS), gens   # every client ended on the newest generation
        assert sorted(set(gens)) == [str(g) for g in range(1, 2 + RELOADS)], sorted(set(gens))
    assert "SIGKILL" not in log and "on_move failed" not in log
