"""`http.busy_limit`: a busy worker leaves a shared listener's queue to the others.

On a `shared` listener every worker accepts from one queue, and a worker that
takes what is there whenever it wakes serves its share in long passes while
the others idle: the connections it took wait for its whole pass (FastAPI with
64 clients opening a connection per request, 4 workers: p99 50-66 ms, 27-31
with the limit; docs/workers.md "Which listener mode"). So a worker stops
accepting while `busy_limit` requests are starting (accepted, their protocol not
connected yet) or in progress, and accepts again when one ends. A request
counts for WINDOW at most: long polls and streams must not stop a worker
accepting. On a `reuseport` listener the queue is this worker's alone, and
nobody else would take what we leave: the limit does not apply there.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Callable

WINDOW = 1.0   # seconds a request in progress counts towards the limit


class BusyLimit:
    """When to stop and start accepting on the shared listeners, for one worker's server."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int, shared: tuple[str, ...],
                 starting: Callable[[], int], accept: Callable[[str, socket.socket], None]) -> None:
        self.loop, self.limit, self.shared = loop, limit, frozenset(shared)
        self.starting = starting   # how many accepted connections are not connected yet
        self.accept = accept       # the listener's reader, added back at resume
        self.running: dict[Any, float] = {}   # requests started less than WINDOW ago, oldest first
        self.paused: dict[str, socket.socket] = {}
        self.resume_at: asyncio.TimerHandle | None = None
        self.stopped = False   # draining: the listeners are the server's to close

    @property
    def counting(self) -> bool:
        """Return True if requests are counted: some shared listener stops accepting when busy."""
        return self.limit > 0 and bool(self.shared) and not self.stopped

    def applies(self, name: str) -> bool:
        """Return True if listener `name` stops accepting when busy."""
        return self.limit > 0 and name in self.shared and not self.stopped

    def busy(self) -> bool:
        """Return True if `limit` requests are starting or in progress (started recently)."""
        running = self.running
        if self.starting() + len(running) < self.limit:
            return False
        horizon = self.loop.time() - WINDOW
        while running:
            oldest = next(iter(running))
            if running[oldest] > horizon:
                break
            del running[oldest]   # a long poll or a stream: it no longer counts
        return self.starting() + len(running) >= self.limit

    def pause(self, name: str, lsock: socket.socket) -> None:
        """Stop accepting on `lsock` until `resume` finds us no longer busy."""
        self.loop.remove_reader(lsock.fileno())
        self.paused[name] = lsock
        if self.resume_at is None:   # the requests counted now no longer count by then
            self.resume_at = self.loop.call_later(WINDOW, self.resume)

    def resume(self) -> None:
        """Accept again on the paused listeners, unless still busy."""
        if self.resume_at is not None:
            self.resume_at.cancel()
            self.resume_at = None
        if not self.paused or self.stopped:
            return
        if self.busy():
            self.resume_at = self.loop.call_later(WINDOW, self.resume)
            return
        paused, self.paused = self.paused, {}
        for name, lsock in paused.items():
            self.loop.add_reader(lsock.fileno(), self.accept, name, lsock)

    def track(self, cycle: Any, task: asyncio.Future[Any]) -> None:
        """Count a request until its app task is done, however it ends (cancelled before it ran
        too); only where it can matter (`counting`), so reuseport-only workers do no work per request."""
        if self.counting:
            self.started(cycle)
            task.add_done_callback(lambda _task: self.ended(cycle))

    def started(self, cycle: Any) -> None:
        """A request's app task was created."""
        self.running[cycle] = self.loop.time()

    def ended(self, cycle: Any) -> None:
        """A request's app task is done."""
        self.running.pop(cycle, None)
        if self.paused:
            self.resume()

    def stop(self) -> None:
        """The drain: the server takes what is queued on every listener and closes them."""
        self.stopped = True
        self.paused.clear()
        if self.resume_at is not None:
            self.resume_at.cancel()
            self.resume_at = None
