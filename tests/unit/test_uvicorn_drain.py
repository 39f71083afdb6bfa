"""The drain decisions of config/examples/uvicorn_server.py, on real socket pairs.

When may a draining uvicorn close a connection, and which answers say
`Connection: close`? The protocol objects are small stand-ins with the
attributes uvicorn's HTTP protocols have (`cycle`, `pipeline`, `transport`,
`last_read`); the transports wrap real sockets, so the unread-bytes check asks
the kernel.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support import ROOT

pytest.importorskip("uvicorn")
_spec = importlib.util.spec_from_file_location("uvicorn_server", ROOT / "config" / "examples" / "uvicorn_server.py")
assert _spec is not None and _spec.loader is not None
uvicorn_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(uvicorn_server)

GRACE = 1.0
DRAIN_AT = 100.0


@dataclass
class Cycle:
    response_complete: bool


class Transport:
    """The part of an asyncio transport the drain uses: its socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None


@dataclass
class Protocol:
    transport: Transport
    cycle: Cycle | None = None
    last_read: float = 0.0
    pipeline: deque[object] = field(default_factory=deque)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def draining() -> Any:
    drain = uvicorn_server.Drain(GRACE)
    drain.started_at = DRAIN_AT
    return drain


def test_idle_connection_is_closed_only_after_the_grace(pair):
    server_end, _ = pair
    p = Protocol(Transport(server_end))
    drain = draining()
    assert not drain.may_close(p, DRAIN_AT + GRACE - 0.01)
    assert drain.may_close(p, DRAIN_AT + GRACE)


def test_a_read_during_the_drain_restarts_the_grace(pair):
    server_end, _ = pair
    p = Protocol(Transport(server_end), cycle=Cycle(response_complete=True), last_read=DRAIN_AT + 0.5)
    drain = draining()
    assert not drain.may_close(p, DRAIN_AT + GRACE + 0.4)
    assert drain.may_close(p, DRAIN_AT + GRACE + 0.5)


def test_request_in_progress_or_pipelined_keeps_the_connection(pair):
    server_end, _ = pair
    late = DRAIN_AT + 60
    assert not draining().may_close(Protocol(Transport(server_end), cycle=Cycle(False)), late)
    queued = Protocol(Transport(server_end), cycle=Cycle(True), pipeline=deque([object()]))
    assert not draining().may_close(queued, late)


def test_unread_bytes_in_the_kernel_keep_the_connection(pair):
    server_end, client_end = pair
    p = Protocol(Transport(server_end), cycle=Cycle(True))
    client_end.sendall(b"GET / HTTP/1.1\r\n")
    assert uvicorn_server.unread_bytes(p.transport) == 16
    assert not draining().may_close(p, DRAIN_AT + 60)
    server_end.recv(100)
    assert draining().may_close(p, DRAIN_AT + 60)


async def _answer(app: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
    await app({"type": "http", "path": "/"}, receive, send)
    return sent


async def _hello(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"hi"})


def test_answers_say_connection_close_only_while_draining():
    drain = uvicorn_server.Drain(GRACE)
    app = drain.wrap_app(_hello)
    before = asyncio.run(_answer(app))
    drain.started_at = DRAIN_AT
    during = asyncio.run(_answer(app))
    assert before[0]["headers"] == [(b"content-length", b"2")]
    assert during[0]["headers"] == [(b"content-length", b"2"), (b"connection", b"close")]
    assert before[1] == during[1] == {"type": "http.response.body", "body": b"hi"}


CHILD = """
import os, socket, sys
listener = socket.create_server(("127.0.0.1", 0))
os.dup2(listener.fileno(), 3)   # where socket activation puts the first socket
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
sys.path.insert(0, sys.argv[1])
import uvicorn_server
[sock] = uvicorn_server.inherited_sockets()
print(sock.fileno(), sock.family.name, sock.getsockname() == listener.getsockname(),
      "LISTEN_FDS" in os.environ, sock.getblocking())
"""


def test_inherited_socket_keeps_its_family_and_the_env_is_consumed():
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "config" / "examples")],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["3", "AF_INET", "True", "False", "False"]
