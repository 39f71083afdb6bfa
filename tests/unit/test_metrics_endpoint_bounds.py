"""The metrics endpoint is bounded: a connection cap, deadlines, and no spin when out of fds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.support.upgraderd_proc import ROOT, wait_until
from tests.support.scrape import fetch, parse, value
from upgraderd.config.schema import MetricsSpec
from upgraderd.metrics import endpoint
from upgraderd.metrics.telemetry import Telemetry


@pytest.fixture
def telemetry():
    t = Telemetry.start(MetricsSpec(listen="127.0.0.1:0"), lambda: None, time.monotonic)
    assert t is not None
    yield t
    t.close()


def connect(address: str) -> socket.socket:
    host, port = endpoint.split_address(address)
    return socket.create_connection((host, port), timeout=5)


def closed_by_peer(s: socket.socket) -> bool:
    """Return True once the server closed `s` (EOF or reset)."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_connections_beyond_the_cap_take_the_places_of_the_oldest_idle_ones(telemetry):
    idle = [connect(telemetry.server.address) for _ in range(endpoint.MAX_CONNECTIONS)]
    try:
        wait_until(lambda: len(telemetry.server.httpd._conns) == endpoint.MAX_CONNECTIONS, 10, "the cap to fill")
        extra = [connect(telemetry.server.address) for _ in range(10)]
        wait_until(lambda: telemetry.server.counts()["expired"] == 10, 10, "10 idle connections cut")
        for s in idle[:10]:
            assert closed_by_peer(s)  # at once: recv would otherwise time out after 5 s
        # A newcomer that asks at once is answered, however many idle ones came before it.
        extra[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert extra[-1].recv(100).startswith(b"HTTP/1.1 ")
        assert telemetry.server.counts()["refused"] == 0
        for s in extra:
            s.close()
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: not telemetry.server.httpd._conns, 10, "the idle connections to be forgotten")
    status, body, _ = fetch(f"http://{telemetry.server.address}/metrics")
    assert status == 200
    assert value(parse(body), "upgraderd_metrics_connections_expired_total") >= 10


def test_a_trickling_request_is_cut_at_its_deadline(telemetry, monkeypatch):
    monkeypatch.setattr(endpoint, "MAX_LIFETIME", 0.5)
    s = connect(telemetry.server.address)
    try:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        start = time.monotonic()
        cut = False
        while time.monotonic() - start < 8 and not cut:
            try:
                s.sendall(b"X-Slow: 1\r\n")  # one header line at a time, never the blank line
            except OSError:
                cut = True
                break
            s.settimeout(0.2)
            try:
                cut = s.recv(1) == b""
            except TimeoutError:
                pass
            except OSError:
                cut = True
        assert cut, "the server kept a trickling request open past its deadline"
        assert telemetry.server.counts()["expired"] == 1
    finally:
        s.close()


EMFILE_SERVER = """
import os, resource, sys, time
from prometheus_client import CollectorRegistry
from upgraderd.metrics.endpoint import MetricsServer
srv = MetricsServer("127.0.0.1:0", CollectorRegistry(), lambda: (True, True, "ok"))
srv.start()
used = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 2, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print(srv.address, flush=True)
sys.stdin.readline()
print(srv.counts()["accept_errors"], flush=True)
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_fds_the_endpoint_backs_off_instead_of_spinning():
    proc = subprocess.Popen([sys.executable, "-c", EMFILE_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            cwd=ROOT, text=True)
    held: list[socket.socket] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        address = proc.stdout.readline().strip()
        held = [connect(address) for _ in range(30)]  # far more than its 2 spare fds
        wait_until(lambda: cpu_seconds(proc.pid) > 0, 5, "the server to run")
        before, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(2.0)  # a measurement window, not a wait for a condition
        busy = (cpu_seconds(proc.pid) - before) / (time.monotonic() - t0)
        proc.stdin.write("\n")
        proc.stdin.flush()
        errors = int(proc.stdout.readline())
        assert busy < 0.2, f"the endpoint used {busy:.0%} of a CPU while out of fds"
        assert errors > 0, "the test did not exhaust the server's fds"
    finally:
        for s in held:
            s.close()
        proc.kill()
        proc.wait(10)
