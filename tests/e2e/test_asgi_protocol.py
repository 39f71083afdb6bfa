"""upgraderd's HTTP server against hostile and unusual clients, and a reload mid-request (issue 22).

One daemon serves tests/fixtures/asgi_routes.py for the whole module, with
small limits and timeouts. Every hostile case asserts the exact status, that
the connection is closed, and that the worker still serves the next client;
the timeouts also check that a connection in another state is not affected.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.support import ROOT
from tests.support.keepalive import read_response
from tests.support.upgraderd_proc import Daemon, free_port

pytestmark = pytest.mark.e2e

LIMITS = {"max_header_bytes": 4096, "max_body_bytes": 1024, "header_timeout": "1s",
          "request_timeout": "4s", "access_log": True, "root_path": "/api",
          "trusted_proxies": ["127.0.0.2"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("asgi")
    port = free_port()
    cfg = {"listeners": [{"name": "web", "host": "127.0.0.1", "port": port}],
           "workers": {"count": 1, "app": "asgi:asgi_routes:app", "cwd": str(ROOT / "tests/fixtures")},
           "http": LIMITS, "drain": {"timeout": "10s"}, "metrics": {"listen": None}}
    with Daemon(tmp, cfg).start() as d:
        yield d, port


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def exchange(port: int, raw: bytes) -> tuple[bytes, bool]:
    """Send `raw`; return the status line of the answer and whether the server then closed."""
    with connect(port) as sock:
        sock.sendall(raw)
        answer = read_response(sock, bytearray())
        sock.settimeout(3)
        closed = sock.recv(1) == b""
    return answer.status, closed


def still_serves(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(b"GET /api/who HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = read_response(sock, bytearray())
    assert answer.status == b"HTTP/1.1 200 OK" and answer.body.startswith(b"generation=1 ")


SMUGGLING = {
    "content-length and transfer-encoding":
        b"POST /api/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two content-lengths":
        b"POST /api/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "obsolete line folding": b"GET /api/who HTTP/1.1\r\nHost: t\r\nX-A: b\r\n c\r\n\r\n",
    "invalid chunk size":
        b"POST /api/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "chunk size overflow":
        b"POST /api/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\na\r\n0\r\n\r\n",
    "bare LF": b"GET /api/who HTTP/1.1\nHost: t\n\n",
    "chunked not last": b"POST /api/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_request_smuggling_shapes_get_400_and_a_close(server, name):
    _d, port = server
    assert exchange(port, SMUGGLING[name]) == (b"HTTP/1.1 400 Bad Request", True)
    still_serves(port)


def test_an_oversized_head_gets_431_and_a_close(server):
    _d, port = server
    big = b"GET /api/who HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(60))
    assert exchange(port, big + b"\r\n") == (b"HTTP/1.1 431 Request Header Fields Too Large", True)
    # One huge header line, sent in pieces: refused before it ends.
    with connect(port) as sock:
        sock.sendall(b"GET /api/who HTTP/1.1\r\nHost: t\r\nX-Big: ")
        for _ in range(10):
            sock.sendall(b"v" * 1000)
        answer = read_response(sock, bytearray())
    assert answer.status == b"HTTP/1.1 431 Request Header Fields Too Large"
    still_serves(port)


def test_an_error_answer_is_not_reset_away_while_the_client_still_sends(server):
    # The server half-closes after the 431 and reads and drops what still comes: a close with
    # unread bytes would send RST, and the client could lose the answer or get EPIPE sending.
    _d, port = server
    with connect(port) as sock:
        sock.sendall(b"GET /api/who HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * 20000)
        answer = read_response(sock, bytearray())
        assert answer.status == b"HTTP/1.1 431 Request Header Fields Too Large"
        for _ in range(20):
            sock.sendall(b"v" * 1000)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""
    still_serves(port)


def test_an_oversized_body_gets_413_whether_announced_or_chunked(server):
    _d, port = server
    announced = b"POST /api/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n"
    assert exchange(port, announced) == (b"HTTP/1.1 413 Request Entity Too Large", True)
    chunked = b"POST /api/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + b"200\r\n" + \
        b"x" * 512 + b"\r\n" + b"200\r\n" + b"x" * 512 + b"\r\n" + b"10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n"
    assert exchange(port, chunked) == (b"HTTP/1.1 413 Request Entity Too Large", True)
    still_serves(port)


def test_a_slowloris_client_gets_408_while_others_are_served(server):
    _d, port = server
    with connect(port) as slow:
        slow.sendall(b"GET /api/who HTTP/1.1\r\nHost: t\r\n")
        started = time.monotonic()
        still_serves(port)   # meanwhile, another client is served at once
        answer = read_response(slow, bytearray())
        assert answer.status == b"HTTP/1.1 408 Request Timeout"
        assert 0.9 <= time.monotonic() - started < 5
        assert slow.recv(1) == b""


def test_an_app_that_raises_gets_500_and_one_that_hangs_times_out(server):
    d, port = server
    assert exchange(port, b"GET /api/raise HTTP/1.1\r\nHost: t\r\n\r\n") == \
        (b"HTTP/1.1 500 Internal Server Error", True)
    with connect(port) as hung:
        hung.sendall(b"GET /api/hang HTTP/1.1\r\nHost: t\r\n\r\n")
        still_serves(port)   # the hung request holds nothing but its own connection
        answer = read_response(hung, bytearray())
        assert answer.status == b"HTTP/1.1 500 Internal Server Error"
        assert b"did not answer in time" in answer.body
    still_serves(port)
    assert "RuntimeError: the app failed on purpose" in d.log()


def test_keepalive_chunked_echo_expect_continue_and_streaming(server):
    _d, port = server
    with connect(port) as sock:
        buf = bytearray()
        sock.sendall(b"POST /api/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
        answer = read_response(sock, buf)
        assert (answer.status, answer.body, answer.closes) == (b"HTTP/1.1 200 OK", b"abcdefg", False)
        sock.sendall(b"POST /api/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(4096)
        assert bytes(buf).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        del buf[:len(b"HTTP/1.1 100 Continue\r\n\r\n")]
        sock.sendall(b"hello")
        answer = read_response(sock, buf)
        assert answer.body == b"hello" and not answer.closes
        sock.sendall(b"GET /api/stream?n=3 HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            data += sock.recv(4096)
        assert b"transfer-encoding: chunked" in data and b"7\r\npart 2\n\r\n0\r\n\r\n" in data
        sock.sendall(b"GET /api/who HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(sock, bytearray()).status == b"HTTP/1.1 200 OK"   # same connection throughout


def test_scope_root_path_forwarded_headers_and_lifespan_state(server):
    _d, port = server
    request = b"GET /api/scope?a=1 HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 203.0.113.9, 127.0.0.2\r\n" \
              b"X-Forwarded-Proto: https\r\n\r\n"
    with connect(port) as sock:   # from 127.0.0.1: not a trusted proxy, its headers are ignored
        sock.sendall(request)
        doc = json.loads(read_response(sock, bytearray()).body)
    assert (doc["path"], doc["root_path"], doc["scheme"], doc["client"][0]) == ("/api/scope", "/api", "http", "127.0.0.1")
    assert doc["query_string"] == "a=1" and doc["raw_path"] == "/api/scope"
    with connect(port, "127.0.0.2") as sock:   # a trusted proxy
        sock.sendall(request)
        doc = json.loads(read_response(sock, bytearray()).body)
    assert (doc["scheme"], doc["client"][0]) == ("https", "203.0.113.9")
    with connect(port) as sock:
        sock.sendall(b"GET /api/state HTTP/1.1\r\nHost: t\r\n\r\n")
        state = json.loads(read_response(sock, bytearray()).body)
    assert isinstance(state["started_in"], int)


def test_a_request_in_progress_finishes_on_the_old_worker_then_the_connection_moves(server):
    d, port = server
    with connect(port) as sock:
        sock.sendall(b"GET /api/who HTTP/1.1\r\nHost: t\r\n\r\n")
        first = read_response(sock, bytearray())
        old = first.body.split()[0]
        gen = int(old.split(b"=")[1])
        sock.sendall(b"GET /api/slow?ms=3000 HTTP/1.1\r\nHost: t\r\n\r\n")
        d.hup()
        d.wait_log(rf"generation {gen} ACTIVE -> DRAINING")
        sock.settimeout(0)   # without a timeout, or Python waits for the socket to be readable
        with pytest.raises(BlockingIOError):   # the drain began while the request was in progress
            sock.recv(1, socket.MSG_PEEK)
        sock.settimeout(10)
        slow = read_response(sock, bytearray())
        assert slow.body.split()[0] == old and not slow.closes   # answered by the old worker, kept open
        sock.sendall(b"GET /api/who HTTP/1.1\r\nHost: t\r\n\r\n")
        after = read_response(sock, bytearray())
        assert after.body.split()[0] == b"generation=%d" % (gen + 1) and not after.closes
        assert after.body.split()[2] == first.body.split()[2]   # the same client port: the same connection
    d.wait_log(rf"generation {gen} DRAINING -> RETIRED")
