"""http.busy_limit's state (upgraderd/apps/asgi/busy.py) on a fake loop and clock."""

from __future__ import annotations

import socket
from typing import Any, Callable

import pytest

from upgraderd.apps.asgi.busy import WINDOW, BusyLimit


class Handle:
    def __init__(self, at: float, callback: Callable[[], None]) -> None:
        self.at, self.callback, self.cancelled = at, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The parts of an event loop BusyLimit uses: a clock, timers and readers."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[Handle] = []
        self.readers: dict[int, tuple[Any, ...]] = {}

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> Handle:
        handle = Handle(self.now + delay, callback)
        self.timers.append(handle)
        return handle

    def add_reader(self, fd: int, callback: Any, *args: Any) -> None:
        self.readers[fd] = (callback, *args)

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [h for h in self.timers if h.at <= self.now and not h.cancelled]
        self.timers = [h for h in self.timers if h not in due]
        for h in due:
            h.callback()

    def pending(self) -> list[Handle]:
        return [h for h in self.timers if not h.cancelled]


class Rig:
    def __init__(self, limit: int = 2, shared: tuple[str, ...] = ("web",)) -> None:
        self.loop = FakeLoop()
        self.starting = 0
        self.lsock = socket.socket()
        self.loop.add_reader(self.lsock.fileno(), "accept", "web", self.lsock)
        self.gate = BusyLimit(self.loop, limit, shared, lambda: self.starting, "accept")  # type: ignore[arg-type]

    def accepting(self) -> bool:
        return self.lsock.fileno() in self.loop.readers


@pytest.fixture
def rig() -> Any:
    r = Rig()
    yield r
    r.lsock.close()


def test_the_limit_applies_to_shared_listeners_only_and_not_at_zero() -> None:
    loop = FakeLoop()
    assert BusyLimit(loop, 8, ("web",), lambda: 0, print).applies("web")  # type: ignore[arg-type]
    assert not BusyLimit(loop, 8, ("web",), lambda: 0, print).applies("api")  # type: ignore[arg-type]
    assert not BusyLimit(loop, 0, ("web",), lambda: 0, print).applies("web")  # type: ignore[arg-type]
    # Requests are counted only where some listener can pause: no per-request work otherwise.
    assert BusyLimit(loop, 8, ("web",), lambda: 0, print).counting  # type: ignore[arg-type]
    assert not BusyLimit(loop, 8, (), lambda: 0, print).counting  # type: ignore[arg-type]
    assert not BusyLimit(loop, 0, ("web",), lambda: 0, print).counting  # type: ignore[arg-type]


def test_starting_and_running_requests_count_and_the_first_to_end_resumes_accepting(rig: Rig) -> None:
    a, b = object(), object()
    rig.starting = 1
    assert not rig.gate.busy()
    rig.gate.started(a)
    assert rig.gate.busy()   # one connecting, one request in progress: 2 of 2
    rig.gate.pause("web", rig.lsock)
    assert not rig.accepting()
    rig.starting = 0
    rig.gate.started(b)
    rig.loop.advance(0.1)
    assert not rig.accepting()   # still 2 requests in progress
    rig.gate.ended(a)
    assert rig.accepting() and rig.loop.readers[rig.lsock.fileno()] == ("accept", "web", rig.lsock)
    assert rig.loop.pending() == []   # the window's timer went with the pause


def test_a_request_counts_for_the_window_only_so_hanging_requests_cannot_stop_accepting(rig: Rig) -> None:
    rig.gate.started(object())
    rig.gate.started(object())
    assert rig.gate.busy()
    rig.gate.pause("web", rig.lsock)
    rig.loop.advance(0.5)
    later = object()
    rig.gate.started(later)   # a keep-alive connection's next request, say
    rig.loop.advance(0.25)
    assert not rig.accepting()
    rig.loop.advance(WINDOW - 0.75)   # the first two are a second old now: 1 of 2 counts
    assert rig.accepting()
    assert list(rig.gate.running) == [later]


def test_still_busy_at_the_window_waits_for_another(rig: Rig) -> None:
    rig.gate.started(object())
    rig.gate.pause("web", rig.lsock)
    rig.loop.advance(0.75)
    rig.gate.started(object())
    rig.gate.started(object())
    rig.loop.advance(0.25)   # the window's timer: two later requests still count
    assert not rig.accepting() and len(rig.loop.pending()) == 1
    rig.loop.advance(WINDOW)
    assert rig.accepting()


def test_the_drain_stops_it_for_good(rig: Rig) -> None:
    rig.gate.started(object())
    rig.gate.started(object())
    rig.gate.pause("web", rig.lsock)
    rig.gate.stop()
    assert rig.loop.pending() == [] and not rig.gate.applies("web") and not rig.gate.counting
    rig.gate.ended(next(iter(rig.gate.running)))
    rig.loop.advance(2 * WINDOW)
    assert not rig.accepting()   # the server accepts what is queued itself, then closes the listener


class FakeTask:
    def __init__(self) -> None:
        self.callbacks: list[Callable[[Any], None]] = []

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self.callbacks.append(fn)

    def finish(self) -> None:
        for fn in self.callbacks:
            fn(self)


def test_a_tracked_request_counts_until_its_task_is_done_and_only_where_a_listener_can_pause(rig: Rig) -> None:
    cycle, task = object(), FakeTask()
    rig.gate.track(cycle, task)  # type: ignore[arg-type]
    assert list(rig.gate.running) == [cycle]
    task.finish()
    assert rig.gate.running == {}
    reuseport_only = BusyLimit(rig.loop, 8, (), lambda: 0, print)  # type: ignore[arg-type]
    other = FakeTask()
    reuseport_only.track(object(), other)  # type: ignore[arg-type]
    assert reuseport_only.running == {} and other.callbacks == []
