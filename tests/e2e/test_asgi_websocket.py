"""WebSockets on upgraderd's server (wsproto), checked with an independent client (`websockets`).

The app is tests/fixtures/asgi_routes.py. A reload closes every open WebSocket
with 1012 (Service Restart), only once the new generation is ACTIVE, and never
abnormally (1006): the client gets the close frame before the TCP connection ends.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import struct

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.support import ROOT
from tests.support.upgraderd_proc import Daemon, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(tmp_path):
    port = free_port()
    cfg = {"listeners": [{"name": "web", "host": "127.0.0.1", "port": port}],
           "workers": {"count": 2, "app": "asgi:asgi_routes:app", "cwd": str(ROOT / "tests/fixtures")},
           "http": {"websocket_max_message": 4096}, "drain": {"timeout": "10s"}, "metrics": {"listen": None}}
    with Daemon(tmp_path, cfg).start() as d:
        yield d, port


def test_echo_subprotocol_denial_and_refusal(server):
    _d, port = server
    with connect(f"ws://127.0.0.1:{port}/ws", subprotocols=["chat.v2", "chat.v1"], compression=None) as ws:
        assert ws.subprotocol == "chat.v2"
        ws.send("hello")
        assert ws.recv(timeout=5) == "1:hello"
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=5) == b"\x00\x01binary"
    with pytest.raises(InvalidStatus) as denied:
        connect(f"ws://127.0.0.1:{port}/ws-deny", open_timeout=5)
    assert denied.value.response.status_code == 401 and denied.value.response.body == b"go away"
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{port}/ws-close", open_timeout=5)
    assert refused.value.response.status_code == 403


def test_permessage_deflate_is_not_negotiated(server):
    _d, port = server
    with connect(f"ws://127.0.0.1:{port}/ws") as ws:   # the client offers permessage-deflate
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        ws.send("x" * 1000)
        assert ws.recv(timeout=5) == "1:" + "x" * 1000


def raw_handshake(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101 ")
    return sock


def masked_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    size = bytes([0x80 | len(payload)]) if len(payload) < 126 else bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    return bytes([0x80 | opcode]) + size + mask + body


def close_code(sock: socket.socket) -> int:
    data = b""
    while len(data) < 4:
        chunk = sock.recv(4096)
        assert chunk, "EOF without a close frame"
        data += chunk
    assert data[0] == 0x88, data   # FIN + close
    return int(struct.unpack("!H", data[2:4])[0])


def test_invalid_utf8_closes_1007_and_an_oversized_message_1009(server):
    _d, port = server
    with raw_handshake(port) as sock:
        sock.sendall(masked_frame(0x1, b"\xff\xfe not utf-8"))
        assert close_code(sock) == 1007
    with raw_handshake(port) as sock:
        sock.sendall(masked_frame(0x2, b"x" * 5000))
        assert close_code(sock) == 1009
    with connect(f"ws://127.0.0.1:{port}/ws") as ws:   # the worker serves on
        ws.send("still")
        assert ws.recv(timeout=5) == "1:still"


def test_a_reload_closes_websockets_with_1012_once_the_new_generation_is_active(server):
    d, port = server
    clients = [connect(f"ws://127.0.0.1:{port}/ws", ping_interval=None) for _ in range(8)]
    for ws in clients:
        ws.send("before")
        assert ws.recv(timeout=5) == "1:before"
    d.hup()
    codes = []
    for ws in clients:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=15)
        assert closed.value.rcvd is not None, "closed without a close frame (1006)"
        codes.append(closed.value.rcvd.code)
    assert codes == [1012] * 8
    log = d.log()
    # The old workers closed them as they drained, which the master starts only after ACTIVE.
    assert re.search(r"generation 2 STARTING -> ACTIVE[^\n]*\n(.*\n)*.*generation 1 ACTIVE -> DRAINING", log)
    with connect(f"ws://127.0.0.1:{port}/ws") as ws:   # a client that reconnects lands on generation 2
        ws.send("after")
        assert ws.recv(timeout=5) == "2:after"
