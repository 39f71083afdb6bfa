"""Clients of config/examples/pubsub.py: N subscribers and one publisher, for reload tests.

`Broadcast` connects the publisher first (so the server, which offers its
clients in the order it took them, puts the publisher in the first hand-off
batch: the case in which a broadcast server used to deliver before the later
batches had arrived), then N subscribers to one topic. A publisher thread
sends `PUB <topic> <i>` for i = 1, 2, ... and reads each answer `OK pub <k>`,
k being how many subscribers the server delivered it to; a reader thread
collects every subscriber's lines. Every loop is bounded in time, and every
socket is closed by `close()`.

What the tests assert from it: every answer said k == N (no message went to
part of the subscribers), every subscriber got `MSG <topic> 1..M` exactly
once and in order, and none of them saw its connection end (same TCP
connection, same local port, throughout).
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Subscriber:
    sock: socket.socket
    port: int
    lines: list[str] = field(default_factory=list)
    buf: bytes = b""
    closed: bool = False


def _line(sock: socket.socket, deadline: float) -> str:
    """Read one line from a blocking socket, byte by byte (only for the handshake)."""
    out = b""
    while not out.endswith(b"\n"):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        out += chunk
    return out.decode().rstrip("\n")


class Broadcast:
    """One publisher and `count` subscribers of `topic` on 127.0.0.1:`port`."""

    def __init__(self, port: int, count: int, topic: str = "news", interval: float = 0.002) -> None:
        self.port, self.topic, self.interval = port, topic, interval
        self.pub = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.subs: list[Subscriber] = []
        deadline = time.monotonic() + 30
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(f"SUB {topic}\n".encode())
            answer = _line(s, deadline)
            assert answer == f"OK sub {topic}", answer
            self.subs.append(Subscriber(s, s.getsockname()[1]))
        self.published = 0
        self.answers: list[int] = []   # k of each `OK pub k`, in order
        self.errors: list[str] = []
        self._read_until = float("inf")
        self._stop = threading.Event()      # the publisher stops
        self._last = threading.Event()      # the publisher has stopped: read what is left
        self._threads = [threading.Thread(target=self._publish, daemon=True),
                         threading.Thread(target=self._read, daemon=True)]

    def start(self) -> Broadcast:
        for t in self._threads:
            t.start()
        return self

    def _publish(self) -> None:
        buf = b""
        try:
            while not self._stop.is_set():
                n = self.published + 1
                self.pub.sendall(f"PUB {self.topic} {n}\n".encode())
                while b"\n" not in buf:
                    chunk = self.pub.recv(4096)   # timeout 10 s: a stuck server fails the test
                    if not chunk:
                        raise ConnectionError("the publisher's connection closed")
                    buf += chunk
                line, _, buf = buf.partition(b"\n")
                verb, _, k = line.decode().rpartition(" ")
                if verb != "OK pub" or not k.isdigit():
                    raise ValueError(f"unexpected answer {line!r}")
                self.answers.append(int(k))
                self.published = n
                time.sleep(self.interval)  # pacing, not waiting for a condition
        except (OSError, ValueError) as e:
            self.errors.append(f"publisher: {e!r}")

    def _read(self) -> None:
        sel = selectors.DefaultSelector()
        for sub in self.subs:
            sub.sock.setblocking(False)
            sel.register(sub.sock, selectors.EVENT_READ, sub)
        try:
            while not self._last.is_set() or self._unread():
                for key, _ in sel.select(0.1):
                    sub = key.data
                    try:
                        chunk = sub.sock.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        chunk = b""
                    if not chunk:
                        sub.closed = True
                        sel.unregister(sub.sock)
                        continue
                    *lines, sub.buf = (sub.buf + chunk).split(b"\n")
                    sub.lines += [x.decode() for x in lines]
                if self._last.is_set() and time.monotonic() > self._read_until:
                    return
        finally:
            sel.close()

    def _unread(self) -> bool:
        return any(len(s.lines) < self.published and not s.closed for s in self.subs)

    def wait_published(self, count: int, timeout: float = 20.0) -> None:
        """Wait until `count` messages more than now were answered."""
        target, end = self.published + count, time.monotonic() + timeout
        while self.published < target and not self.errors and time.monotonic() < end:
            time.sleep(0.01)
        assert self.published >= target, (self.published, target, self.errors)

    def finish(self, timeout: float = 20.0) -> None:
        """Stop publishing, then read until every subscriber has every message (or `timeout`)."""
        self._stop.set()
        self._threads[0].join(15)
        self._read_until = time.monotonic() + timeout
        self._last.set()
        self._threads[1].join(timeout + 5)

    def problems(self) -> list[str]:
        """Return every way the run fell short of 'each subscriber got 1..M once, in order'."""
        n, want = len(self.subs), [f"MSG {self.topic} {i}" for i in range(1, self.published + 1)]
        out = list(self.errors)
        short = [i + 1 for i, k in enumerate(self.answers) if k != n]
        if short:
            out.append(f"{len(short)} of {len(self.answers)} messages reached fewer than {n} subscribers, "
                       f"e.g. message {short[0]}: {self.answers[short[0] - 1]}")
        for i, sub in enumerate(self.subs):
            if sub.closed:
                out.append(f"subscriber {i} (port {sub.port}): connection closed")
            if sub.sock.fileno() >= 0 and sub.sock.getsockname()[1] != sub.port:
                out.append(f"subscriber {i}: local port changed")
            if sub.lines != want:
                missing = sorted(set(want) - set(sub.lines))
                out.append(f"subscriber {i}: {len(sub.lines)} lines for {len(want)} messages, "
                           f"{len(missing)} missing (first {missing[:3]})")
        return out

    def lost(self) -> int:
        """Return the deliveries missing: N x M minus what the subscribers got right."""
        want = {f"MSG {self.topic} {i}" for i in range(1, self.published + 1)}
        return sum(len(want - set(s.lines)) for s in self.subs)

    def close(self) -> None:
        self._stop.set()
        self._read_until = 0.0
        self._last.set()
        for t in self._threads:
            if t.is_alive():
                t.join(5)
        self.pub.close()
        for sub in self.subs:
            sub.sock.close()
