"""`http.busy_limit`: on a shared listener, a busy worker leaves new connections to the others (issue 22).

Two workers share one listener with `busy_limit: 1`. A request that hangs in
one worker makes it stop accepting, so the next connections all go to the
other worker; and a request counts for a second at most (busy.WINDOW),
so two hanging requests, one in each worker, do not stop the service.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from tests.support import ROOT
from tests.support.keepalive import read_response
from tests.support.upgraderd_proc import Daemon, free_port

pytestmark = pytest.mark.e2e

WINDOW = 1.0   # upgraderd/apps/asgi/busy.py WINDOW


def config(port: int, mode: str = "shared") -> dict[str, object]:
    return {"listeners": [{"name": "web", "host": "127.0.0.1", "port": port, "mode": mode}],
            "workers": {"count": 2, "app": "asgi:asgi_routes:app", "cwd": str(ROOT / "tests/fixtures")},
            "http": {"busy_limit": 1, "access_log": False}, "drain": {"timeout": "5s"},
            "metrics": {"listen": None}}


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def who(sock: socket.socket) -> int:
    """Ask `sock` which worker serves it; return that pid."""
    sock.sendall(b"GET /who HTTP/1.1\r\nHost: t\r\n\r\n")
    answer = read_response(sock, bytearray())
    assert answer.status == b"HTTP/1.1 200 OK"
    m = re.search(rb"pid=(\d+)", answer.body)
    assert m, answer.body
    return int(m[1])


def hang(d: Daemon, sock: socket.socket, pid: int, seen: int) -> float:
    """Start a request that never ends on `sock` (served by `pid`); return when the app had it."""
    sock.sendall(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
    d.wait_log(rf"asgi_routes: pid {pid} hangs on a request", count=seen, timeout=10)
    return time.monotonic()


def test_a_worker_with_a_request_in_progress_leaves_new_connections_to_the_other(tmp_path):
    port = free_port()
    with Daemon(tmp_path, config(port)).start() as d:
        held = connect(port)
        busy = who(held)
        since = hang(d, held, busy, seen=1)
        served = []
        while len(served) < 20:
            with connect(port) as sock:
                pid = who(sock)
            if time.monotonic() - since >= WINDOW * 0.8:
                break   # the hanging request stops counting soon: what came later proves nothing
            served.append(pid)
        assert len(served) >= 5, f"only {len(served)} answers within {WINDOW * 0.8:.1f} s of the hang"
        assert len(set(served)) == 1 and busy not in served, (busy, served)   # the other worker, each time
        held.close()


def test_requests_that_last_stop_counting_so_hanging_requests_in_every_worker_do_not_stop_the_service(tmp_path):
    port = free_port()
    with Daemon(tmp_path, config(port)).start() as d:
        first = connect(port)
        a = who(first)
        hang(d, first, a, seen=1)
        second = connect(port)
        b = who(second)   # the busy worker does not take it
        assert b != a
        hang(d, second, b, seen=1)
        started = time.monotonic()
        with connect(port) as sock:
            pid = who(sock)   # every worker is busy now, for a second at most
        assert pid in (a, b)
        assert time.monotonic() - started < 10 * WINDOW
        for sock in (first, second):
            sock.close()


def test_on_a_reuseport_listener_each_worker_accepts_its_own_queue_however_busy(tmp_path):
    port = free_port()
    with Daemon(tmp_path, config(port, mode="reuseport")).start() as d:
        held = connect(port)
        busy = who(held)
        since = hang(d, held, busy, seen=1)
        for _ in range(40):   # the kernel spreads new connections over both workers' queues
            with connect(port) as sock:
                if who(sock) == busy:
                    break
        else:
            pytest.fail("the busy worker never accepted from its own queue")
        # at once, not once the hanging request stopped counting
        assert time.monotonic() - since < WINDOW * 0.8
        held.close()
