"""/healthz and /readyz answer while strangers abuse the endpoint (issue 25, finding 3).

The old endpoint served 64 connections and kept each up to 10 s idle or 30 s
trickling: 70 slowloris connections, 2,000 idle ones or connect churn kept
most probes out. Every probe here must get its 200 within 1 s.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.support.upgraderd_proc import Daemon, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e

PROBES = 12


def probe(port: int, path: str) -> tuple[int, float]:
    """GET `path` on a fresh connection; return (status, seconds), status 0 if it failed in 1 s."""
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.settimeout(max(0.01, 1.0 - (time.monotonic() - start)))
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head:
                chunk = s.recv(256)
                if not chunk:
                    break
                head += chunk
        status = int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else 0
    except OSError:
        status = 0
    return status, time.monotonic() - start


def probes_under(port: int) -> list[tuple[str, int, float]]:
    """Probe /healthz and /readyz PROBES times each, 0.25 s apart."""
    out = []
    for i in range(PROBES):
        path = "/healthz" if i % 2 == 0 else "/readyz"
        status, took = probe(port, path)
        out.append((path, status, took))
        time.sleep(0.25)  # the probers' period, not a wait for a condition
    return out


@contextmanager
def attack(fn: Callable[[threading.Event], None], threads: int = 1) -> Iterator[None]:
    stop = threading.Event()
    workers = [threading.Thread(target=fn, args=(stop,), daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    try:
        yield
    finally:
        stop.set()
        for w in workers:
            w.join(10)


def slowloris(port: int, n: int) -> Callable[[threading.Event], None]:
    def run(stop: threading.Event) -> None:
        conns = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            conns.append(s)
        deadline = time.monotonic() + 30
        while not stop.wait(0.3) and time.monotonic() < deadline:
            for i, s in enumerate(conns):
                try:
                    s.sendall(b"X-a: b\r\n")  # a header line at a time, never the blank line
                except OSError:  # cut by the server: come back, as a slowloris client does
                    s.close()
                    try:
                        conns[i] = socket.create_connection(("127.0.0.1", port), timeout=2)
                        conns[i].sendall(b"GET /metrics HTTP/1.1\r\n")
                    except OSError:
                        pass
        for s in conns:
            s.close()
    return run


def idle(port: int, n: int) -> Callable[[threading.Event], None]:
    def run(stop: threading.Event) -> None:
        conns = []
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            conns.append(s)
        stop.wait(30)
        for s in conns:
            s.close()
    return run


def churn(port: int) -> Callable[[threading.Event], None]:
    def run(stop: threading.Event) -> None:
        deadline = time.monotonic() + 30
        for _ in range(200_000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"GET /metr")
            except OSError:
                pass
    return run


@pytest.mark.parametrize("kind", ["slowloris", "idle", "churn"])
def test_every_probe_answers_within_a_second_under_abuse(tmp_path, kind):
    mport = free_port()
    cfg = echo_config(free_port(), count=1, metrics={"listen": f"127.0.0.1:{mport}"})
    with Daemon(tmp_path, cfg).start() as d:
        wait_until(lambda: probe(mport, "/readyz")[0] == 200, 10, "/readyz to answer 200")
        fn, threads = {"slowloris": (slowloris(mport, 70), 1), "idle": (idle(mport, 2000), 1),
                       "churn": (churn(mport), 4)}[kind]
        with attack(fn, threads):
            time.sleep(1.0)  # let the attack fill the endpoint first (a bounded head start)
            seen = probes_under(mport)
        assert [s for s in seen if s[1] != 200 or s[2] > 1.0] == [], seen
        assert d.proc is not None and d.proc.poll() is None
