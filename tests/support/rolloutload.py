"""An HTTP load for rollout scenarios: keep-alive and new-connection clients, every answer timed and attributed.

Each answer's body names the generation that gave it (`generation=N ...`, as
the built-in http app and tests/fixtures/release_app.py answer), so the load
tells how many requests the canary got, which failed, and when:
- `answers`: (monotonic time, generation, HTTP status) per answered request;
- `failures`: (monotonic time, kind, generation of the connection's last answer, 0 if none):
  requests with no whole answer (a reset, EOF, a timeout, a refused connect);
- `reconnects`: keep-alive clients that opened a new connection after one that ended
  unannounced (a failure), and `announced`: after `Connection: close`.

Every client stops at `max_seconds` or `stop()`, whichever comes first.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

from tests.support.keepalive import read_response

REQUEST = b"GET / HTTP/1.1\r\nHost: rollout\r\n\r\n"
CLOSE = b"GET / HTTP/1.1\r\nHost: rollout\r\nConnection: close\r\n\r\n"


@dataclass
class Tally:
    answers: list[tuple[float, int, int]] = field(default_factory=list)
    failures: list[tuple[float, str, int]] = field(default_factory=list)
    reconnects: int = 0
    announced: int = 0

    def between(self, since: float, until: float) -> list[tuple[float, int, int]]:
        return [a for a in self.answers if since <= a[0] <= until]

    def share(self, generation: int, since: float, until: float) -> tuple[int, int]:
        """Return (answers of `generation`, all answers) between the two times."""
        span = self.between(since, until)
        return sum(1 for a in span if a[1] == generation), len(span)

    def bad_answers(self, generation: int) -> int:
        """Return how many answers of `generation` were not 200."""
        return sum(1 for a in self.answers if a[1] == generation and a[2] != 200)


def _generation(body: bytes) -> int:
    head = body.split(b" ", 1)[0]
    return int(head.partition(b"=")[2] or 0) if head.startswith(b"generation=") else 0


class RolloutLoad:
    """`keepalive` clients on one connection each and `fresh` clients with a connection per request."""

    def __init__(self, port: int, keepalive: int = 8, fresh: int = 8, max_seconds: float = 120.0,
                 timeout: float = 5.0) -> None:
        self.addr = ("127.0.0.1", port)
        self.keepalive, self.fresh, self.timeout = keepalive, fresh, timeout
        self.until = time.monotonic() + max_seconds
        self.tally = Tally()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> RolloutLoad:
        for target, n in ((self._keepalive, self.keepalive), (self._fresh, self.fresh)):
            for _ in range(n):
                t = threading.Thread(target=target, daemon=True)
                t.start()
                self._threads.append(t)
        return self

    def count(self) -> int:
        with self._lock:
            return len(self.tally.answers)

    def stop(self) -> Tally:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        assert not any(t.is_alive() for t in self._threads), "a client thread did not stop"
        return self.tally

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self.until

    def _answer(self, generation: int, status: int) -> None:
        with self._lock:
            self.tally.answers.append((time.monotonic(), generation, status))

    def _failed(self, e: BaseException, generation: int) -> None:
        with self._lock:
            self.tally.failures.append((time.monotonic(), type(e).__name__, generation))

    def _keepalive(self) -> None:
        sock: socket.socket | None = None
        buf, generation, lost = bytearray(), 0, False
        while self._running():
            try:
                if sock is None:
                    sock, buf = socket.create_connection(self.addr, timeout=self.timeout), bytearray()
                    with self._lock:
                        if lost:
                            self.tally.reconnects += 1
                    lost = False
                sock.sendall(REQUEST)
                answer = read_response(sock, buf)
            except Exception as e:  # every way a request can get no answer is a failure
                self._failed(e, generation)
                lost = True
                if sock is not None:
                    sock.close()
                sock = None
                time.sleep(0.01)
                continue
            generation = _generation(answer.body)
            self._answer(generation, int(answer.status.split(b" ")[1]))
            if answer.closes:
                sock.close()
                sock = None
                with self._lock:
                    self.tally.announced += 1
        if sock is not None:
            sock.close()

    def _fresh(self) -> None:
        while self._running():
            try:
                with socket.create_connection(self.addr, timeout=self.timeout) as sock:
                    sock.sendall(CLOSE)
                    answer = read_response(sock, bytearray())
            except Exception as e:  # a refused connect, a reset, EOF, a timeout
                self._failed(e, 0)
                time.sleep(0.01)
                continue
            self._answer(_generation(answer.body), int(answer.status.split(b" ")[1]))
