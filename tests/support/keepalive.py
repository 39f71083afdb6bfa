"""A keep-alive HTTP load client that accounts for every request and every reconnect.

Each client thread holds one connection and sends `GET /seq/<client>/<n>` on it,
n = 1, 2, 3, ... The example apps echo the path and the peer port they saw, so
each answer is checked to be the answer to this very request (the sequence
number, in order) on this very connection (the client's own local port).

A client reconnects only when the server said it would close: a response with
`Connection: close`, or an HTTP/1.0 response without `keep-alive`. Those are
counted as `announced` closes; that is how a server that exits hands its
clients to the next generation. Anything else that ends a connection (a reset,
EOF before the whole response, a timeout, a wrong answer) is a lost request,
counted by kind in `result.outcomes`, and the reconnect after it is counted in
`unannounced`. A lossless drain has no failures and no unannounced reconnects.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from tests.support.loadgen import OK, Load, _classify


@dataclass
class Answer:
    """One parsed HTTP response."""

    status: bytes
    headers: dict[bytes, bytes]
    body: bytes
    closes: bool        # the server announced that it closes the connection


class Unanswered(Exception):
    """The connection ended before a whole response arrived."""


class WrongAnswer(Exception):
    """A response that is not the answer to the request just sent."""


def read_response(sock: socket.socket, buf: bytearray) -> Answer:
    """Read one response with a Content-Length body from `sock`; `buf` keeps extra bytes."""
    while b"\r\n\r\n" not in buf:
        _fill(sock, buf)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"-1"))
    if length < 0:
        raise WrongAnswer(f"no Content-Length: {head[:200]!r}")
    buf[:] = rest
    while len(buf) < length:
        _fill(sock, buf)
    body = bytes(buf[:length])
    del buf[:length]
    conn = headers.get(b"connection", b"").lower()
    http10 = lines[0].startswith(b"HTTP/1.0")
    closes = b"close" in conn or (http10 and b"keep-alive" not in conn)
    return Answer(lines[0], headers, body, closes)


def _fill(sock: socket.socket, buf: bytearray) -> None:
    chunk = sock.recv(65536)
    if not chunk:
        raise Unanswered(f"EOF after {len(buf)} bytes of the response")
    buf += chunk


class KeepAliveLoad(Load):
    """`clients` keep-alive connections, each sending requests one after another."""

    def __init__(self, host: str, port: int, clients: int = 16, max_seconds: float = 60.0,
                 think: float = 0.005, timeout: float = 5.0) -> None:
        super().__init__(host, port, threads=clients, max_seconds=max_seconds, timeout=timeout)
        self.think = think
        self.announced = 0
        self.unannounced = 0
        self.connections = 0

    def start(self, target: str = "http-keepalive") -> KeepAliveLoad:
        """Start the client threads."""
        for i in range(self.threads):
            t = threading.Thread(target=self._client, args=(i,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def _count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def _client(self, idx: int) -> None:
        seq = 0
        sock: socket.socket | None = None
        buf = bytearray()
        while self._running(seq):
            if sock is None:
                sock, buf = self._connect()
                if sock is None:
                    continue
            seq += 1
            keep = self._round_trip(sock, buf, idx, seq)
            if not keep:
                sock.close()
                sock = None
            elif self.think:
                time.sleep(self.think)
        if sock is not None:
            sock.close()

    def _connect(self) -> tuple[socket.socket | None, bytearray]:
        try:
            sock = socket.create_connection(self.addr, timeout=self.timeout)
        except Exception as e:  # a refused connect is a lost request too
            self._record(_classify(e), 0.0, repr(e))
            time.sleep(0.01)
            return None, bytearray()
        self._count("connections")
        return sock, bytearray()

    def _round_trip(self, sock: socket.socket, buf: bytearray, idx: int, seq: int) -> bool:
        """Send request `seq` and check its answer; return False if the connection is done."""
        path = f"/seq/{idx}/{seq}"
        port = sock.getsockname()[1]
        t0 = time.monotonic()
        try:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
            answer = read_response(sock, buf)
            text = answer.body.decode(errors="replace").strip()
            if answer.status.split(b" ")[1:2] != [b"200"]:
                raise WrongAnswer(f"status {answer.status!r}")
            fields = text.split()
            if f"path={path}" not in fields or f"peer={port}" not in fields:
                raise WrongAnswer(f"asked {path} from port {port}, got {text!r}")
        except Exception as e:
            kind = "wrong" if isinstance(e, WrongAnswer) else "unanswered" if isinstance(e, Unanswered) \
                else _classify(e)
            self._record(kind, 0.0, f"{path}: {e!r}")
            self._count("unannounced")
            time.sleep(0.01)  # a server that fails every request must not be flooded
            return False
        self._record(OK, time.monotonic() - t0, body=text, started=t0)
        if answer.closes:
            self._count("announced")
            return False
        return True
