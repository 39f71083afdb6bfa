"""A bounded load client for the echo and HTTP services, used by tests and bench.

Each thread makes round trips until its count or the shared deadline runs
out, or until `stop()` is called. Every round trip lands in exactly one
outcome bucket, so a test can assert `failures == {}` and know that no
connection was refused, reset, cut short, answered wrongly or left hanging.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

OK = "ok"


@dataclass
class Result:
    """Outcome counts and per-round-trip latencies (seconds)."""

    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    examples: dict[str, str] = field(default_factory=dict)
    bodies: Counter[str] = field(default_factory=Counter)
    # (monotonic time the round trip started, body) of every answer with a body
    answers: list[tuple[float, str]] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return self.outcomes[OK]

    @property
    def failures(self) -> dict[str, int]:
        return {k: v for k, v in self.outcomes.items() if k != OK}


def _classify(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    if isinstance(e, socket.timeout):
        return "timeout"
    if isinstance(e, OSError) and e.errno == errno.ECONNABORTED:
        return "reset"
    return type(e).__name__


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def wait_for_ok(ok: Callable[[], int], n: int, timeout: float) -> bool:
    """Wait until `ok()` (round trips that succeeded so far) reaches `n`; False at the deadline."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ok() >= n:
            return True
        time.sleep(0.01)
    return False


class Load:
    """Run load against one address (or, with `unix`, a Unix socket path) in background threads."""

    def __init__(self, host: str, port: int, threads: int = 8, max_seconds: float = 60.0,
                 max_per_thread: int = 200_000, timeout: float = 5.0, unix: str | None = None) -> None:
        self.addr = (host, port)
        self.unix = unix
        self.threads = threads
        self.deadline = time.monotonic() + max_seconds
        self.max_per_thread = max_per_thread
        self.timeout = timeout
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.result = Result()
        self._workers: list[threading.Thread] = []

    def _record(self, outcome: str, latency: float, detail: str = "", body: str = "",
                started: float = 0.0) -> None:
        with self._lock:
            self.result.outcomes[outcome] += 1
            if outcome == OK:
                self.result.latencies.append(latency)
                if body:
                    self.result.bodies[body] += 1
                    self.result.answers.append((started, body))
            elif outcome not in self.result.examples:
                self.result.examples[outcome] = detail

    def _connect(self) -> socket.socket:
        if self.unix is None:
            return socket.create_connection(self.addr, timeout=self.timeout)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self.unix)
        except BaseException:
            s.close()
            raise
        return s

    def _running(self, done: int) -> bool:
        return not self._stop.is_set() and done < self.max_per_thread and time.monotonic() < self.deadline

    def start(self, target: str) -> Load:
        """Start the threads; target is 'echo', 'echo-keepalive' or 'http'."""
        fn = {"echo": self._echo_per_connection, "echo-keepalive": self._echo_keepalive,
              "http": self._http_per_connection}[target]
        for i in range(self.threads):
            t = threading.Thread(target=fn, args=(i,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def stop(self) -> Result:
        """Stop the threads, wait for them, and return the result."""
        self._stop.set()
        for t in self._workers:
            t.join(self.timeout * 3)
        return self.result

    def mark(self) -> tuple[float, int]:
        """Return a point in time for `answers_since` (the time and the answers so far)."""
        with self._lock:
            return time.monotonic(), len(self.result.answers)

    def answers_since(self, mark: tuple[float, int]) -> Counter[str]:
        """Return the bodies of the answers to round trips that started after `mark`."""
        t, seen = mark
        with self._lock:
            # A round trip that started after the mark ended after it, so it is not
            # among the answers recorded before the mark: scan only the newer ones.
            return Counter(body for started, body in self.result.answers[seen:] if started >= t)

    def wait_for_ok(self, n: int, timeout: float = 10.0) -> bool:
        """Wait until at least `n` round trips succeeded in total."""
        return wait_for_ok(lambda: self.result.ok, n, timeout)

    def _echo_per_connection(self, idx: int) -> None:
        done = 0
        while self._running(done):
            done += 1
            payload = os.urandom(48) + b"%08d" % done
            t0 = time.monotonic()
            try:
                with self._connect() as s:
                    s.sendall(payload)
                    got = _recv_exact(s, len(payload))
            except Exception as e:  # every failure is an outcome to count
                self._record(_classify(e), 0.0, repr(e))
                continue
            if got == payload:
                self._record(OK, time.monotonic() - t0)
            else:
                self._record("short" if len(got) < len(payload) else "wrong", 0.0,
                             f"sent {len(payload)} got {len(got)}")

    def _echo_keepalive(self, idx: int) -> None:
        """One connection per thread, many round trips on it; a reconnect is never needed."""
        try:
            s = self._connect()
        except Exception as e:
            self._record(_classify(e), 0.0, repr(e))
            return
        with s:
            done = 0
            while self._running(done):
                done += 1
                payload = os.urandom(32) + b"%08d" % done
                t0 = time.monotonic()
                try:
                    s.sendall(payload)
                    got = _recv_exact(s, len(payload))
                except Exception as e:
                    self._record(_classify(e), 0.0, repr(e))
                    return
                if got != payload:
                    self._record("short" if len(got) < len(payload) else "wrong", 0.0,
                                 f"sent {len(payload)} got {len(got)}")
                    return
                self._record(OK, time.monotonic() - t0)
                time.sleep(0.005)

    def _http_per_connection(self, idx: int) -> None:
        done = 0
        req = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        while self._running(done):
            done += 1
            t0 = time.monotonic()
            try:
                with self._connect() as s:
                    s.sendall(req)
                    data = bytearray()
                    while chunk := s.recv(65536):
                        data += chunk
            except Exception as e:
                self._record(_classify(e), 0.0, repr(e))
                continue
            head, _, body = bytes(data).partition(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200"):
                self._record(OK, time.monotonic() - t0, body=body.decode(errors="replace").strip(),
                             started=t0)
            else:
                self._record("bad-status" if head else "short", 0.0, head[:80].decode(errors="replace"))
