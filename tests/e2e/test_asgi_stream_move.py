"""Server-sent events across reloads (config/examples/events_app.py, the `upgraderd.http.move` opt-in).

One client reads `/events` (opted in) on one TCP connection through three
HUPs: it sees every event exactly once and in order, the last ones from the
newest generation, and never a second response head. Another reads `/ticks`
(no opt-in) from the first generation: its stream finishes in the old
worker with its last chunk just before drain.timeout (the worker ends it,
rather than the master's SIGKILL cutting it), and nothing of it comes from a
newer generation.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from tests.e2e.test_asgi import web_config
from tests.support.upgraderd_proc import Daemon, free_port

pytestmark = pytest.mark.e2e

RELOADS = 3
DRAIN = 3.0   # seconds: drain.timeout, the bound on a stream that does not move
EVENT = re.compile(rb"id: (\d+)\ndata: event \d+ generation=(\d+) pid=(\d+)\n\n")


class SseReader:
    """A blocking reader of one chunked text/event-stream response on a raw socket."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.local = self.sock.getsockname()[1]
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        self.buf = b""
        self.body = b""
        self.events: list[tuple[int, int, int]] = []   # (id, generation, pid)
        self.ended = False
        head = self._until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower(), head

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    def _until(self, mark: bytes) -> bytes:
        while mark not in self.buf:
            self._fill()
        out, _, self.buf = self.buf.partition(mark)
        return out

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def next_chunk(self) -> None:
        """Read one chunk; parse the events it completes."""
        size = int(self._until(b"\r\n"), 16)
        if size == 0:
            assert self._until(b"\r\n") == b""
            self.ended = True
            return
        self.body += self._exact(size)
        assert self._exact(2) == b"\r\n"
        while True:
            m = EVENT.match(self.body)
            if m is None:
                break
            self.events.append((int(m[1]), int(m[2]), int(m[3])))
            self.body = self.body[m.end():]
        assert b"HTTP/1.1" not in self.body, self.body   # never a second response head

    def read_until(self, done: object, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():   # type: ignore[operator]
            assert time.monotonic() < deadline, f"stalled at {self.events[-3:]}"
            self.next_chunk()


def test_events_move_with_their_connection_and_unmoved_streams_finish_within_drain_timeout(tmp_path):
    port = free_port()
    cfg = web_config("events", port, request_timeout="1h")
    cfg["drain"] = {"handoff": "auto", "timeout": f"{DRAIN:g}s"}
    with Daemon(tmp_path, cfg).start() as d:
        d.wait_log(r"generation 1 STARTING -> ACTIVE")
        moving = SseReader(port, "/events?count=100000&every=0.01")
        staying = SseReader(port, "/ticks?count=100000&every=0.01")
        moving.read_until(lambda: len(moving.events) >= 5)
        staying.read_until(lambda: len(staying.events) >= 5)
        ended_after = -1.0
        for gen in range(2, 2 + RELOADS):
            d.reload_to(gen)
            drain_at = time.monotonic()   # the old generation drains once the new one is ACTIVE
            moving.read_until(lambda: moving.events[-1][1] == gen)   # noqa: B023  (read now, in this pass)
            if gen == 2:
                staying.read_until(lambda: staying.ended, timeout=DRAIN + 5)   # the last chunk, not a cut
                ended_after = time.monotonic() - drain_at
                staying.sock.settimeout(5)
                assert staying.sock.recv(1) == b""   # then the old worker closed it
        last = len(moving.events)
        moving.read_until(lambda: len(moving.events) >= last + 10)   # and it flows on in the newest
        assert moving.sock.getsockname()[1] == moving.local
        log = d.log()
    ids = [e[0] for e in moving.events]
    assert ids == list(range(len(ids))), "an event lost, repeated or out of order"
    gens = [e[1] for e in moving.events]
    assert gens == sorted(gens) and set(gens) == set(range(1, 2 + RELOADS)), sorted(set(gens))
    assert len({e[2] for e in moving.events}) == 1 + RELOADS   # one worker per generation served it
    # Without the opt-in: the stream stayed on its first worker, and ended within drain.timeout.
    assert {e[1] for e in staying.events} == {1}
    assert [e[0] for e in staying.events] == list(range(len(staying.events)))
    assert 0 < ended_after < DRAIN, ended_after
    assert "on_move failed" not in log and "the app failed" not in log
    assert "SIGKILL" not in log   # the old workers ended their streams and exited before drain.timeout
