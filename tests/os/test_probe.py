"""HTTP readiness probes against real sockets on 127.0.0.1, driven the way the master drives them."""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest

from upgraderd.system import probe
from upgraderd.config.validators import parse_url
from upgraderd.system.probe import Prober


class TinyServer:
    """Answer each connection with `self.status` (None: accept and stay silent)."""

    def __init__(self, status: str | None) -> None:
        self.status = status
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.requests.append(conn.recv(4096))
            if self.status is None:
                self.held.append(conn)
                continue
            conn.sendall(f"HTTP/1.1 {self.status}\r\nContent-Length: 0\r\n\r\n".encode())
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


def drive(prober: Prober, until: float) -> list[int]:
    """Run the master's pattern: select on the prober's fd (bounded by its deadline), then poll."""
    while time.monotonic() < until:
        now = time.monotonic()
        due = prober.next_deadline()
        wait = 0.05 if due is None else max(0.0, min(0.05, due - now))
        select.select([prober.fileno()], [], [], wait)
        ready = prober.poll(time.monotonic())
        if ready:
            return ready
    return []


@pytest.fixture
def prober():
    p = Prober(interval=0.02, attempt_timeout=0.3)
    yield p
    p.close()


def test_a_2xx_answer_makes_the_worker_ready(prober):
    srv = TinyServer("204 No Content")
    try:
        prober.add(41, f"http://127.0.0.1:{srv.port}/healthz?x=1", time.monotonic())
        assert drive(prober, time.monotonic() + 5) == [41]
        assert prober.pids() == set()
        assert srv.requests[0].startswith(b"GET /healthz?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    finally:
        srv.close()


def test_a_503_is_retried_until_it_turns_200(prober):
    srv = TinyServer("503 Service Unavailable")
    try:
        prober.add(42, f"http://localhost:{srv.port}/", time.monotonic())
        assert drive(prober, time.monotonic() + 0.3) == []
        assert len(srv.requests) >= 2
        srv.status = "200 OK"
        assert drive(prober, time.monotonic() + 5) == [42]
    finally:
        srv.close()


def test_refused_and_silent_probes_keep_their_reason(prober):
    silent = TinyServer(None)
    closed = socket.create_server(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()
    try:
        prober.add(1, f"http://127.0.0.1:{refused_port}/", time.monotonic())
        prober.add(2, f"http://127.0.0.1:{silent.port}/", time.monotonic())
        assert drive(prober, time.monotonic() + 1.0) == []
        assert prober.remove(1) == (f"http://127.0.0.1:{refused_port}/", "Connection refused")
        assert prober.remove(2) == (f"http://127.0.0.1:{silent.port}/", "no answer within 0.3s")
        assert prober.remove(2) is None
        assert prober.next_deadline() is None
    finally:
        silent.close()


def test_not_http_is_a_failed_attempt(prober):
    raw = socket.create_server(("127.0.0.1", 0))

    def garbage() -> None:
        conn, _ = raw.accept()
        conn.sendall(b"SSH-2.0-nope\r\n")
        conn.close()
    threading.Thread(target=garbage, daemon=True).start()
    try:
        prober.add(3, f"http://127.0.0.1:{raw.getsockname()[1]}/", time.monotonic())
        drive(prober, time.monotonic() + 0.2)
        assert prober.remove(3)[1] == "not an HTTP answer: b'SSH-2.0-nope'"
    finally:
        raw.close()


def test_reserved_ports_lie_below_the_ephemeral_range_and_are_free():
    lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    for _ in range(5):
        port = probe.reserve_port()
        assert max(1024, lo - 8192) <= port < lo
        with socket.create_server(("127.0.0.1", port)):
            pass


@pytest.mark.parametrize("url, target", [
    ("http://127.0.0.1:8080/healthz", ("127.0.0.1", 8080, "/healthz")),
    ("http://localhost", ("127.0.0.1", 80, "/")),
    ("http://[::1]:9000?full", ("::1", 9000, "/?full")),
])
def test_parse_url(url, target):
    assert parse_url(url) == target
