"""ASGI lifespan: startup before the worker says READY=1, shutdown after it drained.

`lifespan: auto` (the default, as in uvicorn) runs it if the app speaks it:
an app that raises before its first `receive()` does not, and is served
without. `on` makes a failed or unsupported startup fatal for the worker
(so the generation fails and the old one serves on); `off` skips it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from upgraderd.apps import logline

App = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


class Lifespan:
    """The lifespan conversation with one app, in one worker."""

    def __init__(self, app: App, mode: str, state: dict[str, Any]) -> None:
        self.app, self.mode, self.state = app, mode, state
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.supported = False

    async def startup(self) -> bool:
        """Run the app's startup; return False if the worker must not serve."""
        if self.mode == "off":
            return True
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        self.task = asyncio.get_running_loop().create_task(self._run(scope))
        await self.inbox.put({"type": "lifespan.startup"})
        answer = await self.outbox.get()
        if answer["type"] == "lifespan.startup.complete":
            return True
        if answer["type"] == "unsupported":
            return self.mode != "on"
        logline.log(f"upgraderd worker: lifespan startup failed: {answer.get('message', '')}", "ERROR")
        return False

    async def shutdown(self) -> None:
        """Run the app's shutdown, if it took part in the startup."""
        if not self.supported or self.task is None or self.task.done():
            return
        await self.inbox.put({"type": "lifespan.shutdown"})
        answer = await self.outbox.get()
        if answer["type"] == "lifespan.shutdown.failed":
            logline.log(f"upgraderd worker: lifespan shutdown failed: {answer.get('message', '')}", "ERROR")

    async def _receive(self) -> dict[str, Any]:
        self.supported = True
        return await self.inbox.get()

    async def _send(self, message: dict[str, Any]) -> None:
        await self.outbox.put(message)

    async def _run(self, scope: dict[str, Any]) -> None:
        try:
            await self.app(scope, self._receive, self._send)
        except BaseException as e:   # noqa: B036  (an app's failure ends the conversation, never the worker)
            if not self.supported:
                await self.outbox.put({"type": "unsupported"})
                return
            if self.mode == "on" or not isinstance(e, Exception):
                logline.log(f"upgraderd worker: lifespan: {type(e).__name__}: {e}", "ERROR")
            await self.outbox.put({"type": "lifespan.startup.failed", "message": repr(e)})
            await self.outbox.put({"type": "lifespan.shutdown.failed", "message": repr(e)})
            return
        if not self.supported:
            await self.outbox.put({"type": "unsupported"})
