"""Persistent clients for hand-off tests and bench: one connection each, never reconnected.

Every echo message carries its connection number and a sequence number and
must come back byte for byte, in order. A connection that fails, reads a
wrong or short answer, or times out is counted by outcome and stops: it is
never replaced, so `failures == {}` together with `ports_kept` means every
connection lived through the whole run on the same local port.

The HTTP variant sends keep-alive requests on each connection. A response
with `Connection: close` is not a failure (a worker without hand-off drains
that way): that client reconnects and the reconnect is counted.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from tests.support.loadgen import _classify, _recv_exact, wait_for_ok


@dataclass
class StreamResult:
    """What the persistent clients saw."""

    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    reconnects: int = 0
    ports_kept: bool = True
    bodies: Counter[str] = field(default_factory=Counter)


class Streams:
    """`n` persistent connections to one address, each driven by its own thread."""

    def __init__(self, port: int, n: int, kind: str = "echo", pause: float = 0.005,
                 max_seconds: float = 120.0, timeout: float = 5.0) -> None:
        self.addr = ("127.0.0.1", port)
        self.n, self.kind, self.pause, self.timeout = n, kind, pause, timeout
        self.deadline = time.monotonic() + max_seconds
        self.result = StreamResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        self.ports: list[int] = []

    def start(self) -> Streams:
        """Connect every client first, then start them talking."""
        for _ in range(self.n):
            s = socket.create_connection(self.addr, timeout=self.timeout)
            self.socks.append(s)
            self.ports.append(s.getsockname()[1])
        fn = self._echo if self.kind == "echo" else self._http
        for i in range(self.n):
            t = threading.Thread(target=fn, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def wait_ok(self, n: int, timeout: float = 20.0) -> bool:
        """Wait until `n` round trips succeeded in total."""
        return wait_for_ok(lambda: self.result.ok, n, timeout)

    def stop(self) -> StreamResult:
        """Stop the clients, close the connections, return the result."""
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout * 3)
        if self.kind == "echo":
            self.result.ports_kept = all(s.fileno() >= 0 and s.getsockname()[1] == p
                                         for s, p in zip(self.socks, self.ports))
        for s in self.socks:
            s.close()
        return self.result

    def _fail(self, outcome: str, detail: str) -> None:
        with self._lock:
            self.result.failures[outcome] += 1
            self.result.examples.setdefault(outcome, detail)

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self.deadline

    def _echo(self, idx: int) -> None:
        s = self.socks[idx]
        seq = 0
        while self._running():
            seq += 1
            msg = b"conn %04d seq %010d " % (idx, seq) + b"x" * (seq % 37) + b"\n"
            try:
                s.sendall(msg)
                got = _recv_exact(s, len(msg))
            except Exception as e:  # every failure is an outcome to count
                self._fail(_classify(e), f"conn {idx} seq {seq}: {e!r}")
                return
            if got != msg:
                self._fail("short" if len(got) < len(msg) else "corrupted",
                           f"conn {idx} seq {seq}: sent {msg!r} got {got!r}")
                return
            with self._lock:
                self.result.ok += 1
            time.sleep(self.pause)

    def _http(self, idx: int) -> None:
        s = self.socks[idx]
        req = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
        while self._running():
            try:
                s.sendall(req)
                head, body = _read_response(s)
            except Exception as e:
                self._fail(_classify(e), f"conn {idx}: {e!r}")
                return
            if not head.startswith(b"HTTP/1.1 200"):
                self._fail("bad-status", head[:80].decode(errors="replace"))
                return
            with self._lock:
                self.result.ok += 1
                self.result.bodies[body.decode(errors="replace").strip()] += 1
            if b"connection: close" in head.lower():
                s.close()
                try:
                    s = socket.create_connection(self.addr, timeout=self.timeout)
                except Exception as e:
                    self._fail(_classify(e), f"conn {idx} reconnect: {e!r}")
                    return
                self.socks[idx] = s
                with self._lock:
                    self.result.reconnects += 1
            time.sleep(self.pause)


def _read_response(s: socket.socket) -> tuple[bytes, bytes]:
    """Read one HTTP response with a Content-Length body; return (head, body)."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionResetError("connection closed before a full response head")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    body = rest + _recv_exact(s, length - len(rest)) if len(rest) < length else rest
    return head, body


def worker_connections(pids: set[int], port: int) -> dict[int, int]:
    """Return how many established TCP connections on local `port` each pid holds."""
    inodes: dict[str, int] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                for row in (line.split() for line in f.readlines()[1:]):
                    if row[3] == "01" and int(row[1].rsplit(":", 1)[1], 16) == port:
                        inodes[row[9]] = 1
        except OSError:
            continue
    out = {}
    for pid in pids:
        n = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    n += 1
        except OSError:
            pass
        out[pid] = n
    return out


def generation_pids(pids: set[int], generation: int) -> dict[int, int]:
    """Return {slot: pid} of the workers among `pids` that belong to `generation`."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split("=", 1) for e in f.read().decode(errors="replace").split("\0") if "=" in e)
        except OSError:
            continue
        if env.get("UPGRADERD_GENERATION") == str(generation) and env.get("UPGRADERD_SLOT", "").isdigit():
            out[int(env["UPGRADERD_SLOT"])] = pid
    return out


def jain(values: list[int]) -> float:
    """Return Jain's fairness index of `values` (1.0: perfectly even)."""
    total = sum(values)
    squares = sum(v * v for v in values)
    return (total * total) / (len(values) * squares) if squares else 1.0
