"""A flow-sticky UDP echo server for a `flows: cookie` listener (config/examples/flow_cookie.yaml).

The wire format, both ways: every datagram starts with a 4-byte cookie. A
client starts a flow with 4 zero bytes; each reply starts with the cookie of
the worker that answered, generation and slot as two big-endian u16s; the
client puts the last cookie it got in front of each datagram that follows.
The master's classic BPF program (upgraderd/system/flowcookie.py) reads those
4 bytes and hands the datagram to that worker's socket for as long as its
generation holds it, so a flow stays with the generation that started it.

Draining: a worker keeps answering its flows after the drain signal, and
exits once none of them has sent anything for IDLE seconds (the master's
`drain.timeout` bounds that). Then its socket closes, and the flows' next
datagrams go to the ACTIVE generation, whose cookie the client then gets.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time

from upgraderd import worker
from upgraderd.apps.server import Server

IDLE = float(os.environ.get("FLOW_IDLE", "0.5"))


class FlowEcho:
    """Answer with our cookie in place of the client's, then the rest of the datagram."""

    def __init__(self) -> None:
        gen, slot = int(os.environ["UPGRADERD_GENERATION"]), int(os.environ["UPGRADERD_SLOT"])
        self.cookie = struct.pack(">HH", gen & 0xFFFF, slot & 0xFFFF)
        self.last = time.monotonic()

    def datagram(self, data: bytes) -> bytes:
        self.last = time.monotonic()
        return self.cookie + data[4:]


class LingeringServer(Server):
    """Keep serving the flows we own after the drain signal, until they go quiet."""

    def __init__(self, listeners: dict[str, socket.socket], proto: FlowEcho) -> None:
        super().__init__(listeners, lambda name: proto)
        self.proto = proto

    def _start_drain(self) -> None:
        self.draining_since = time.monotonic()
        self.metrics.draining()

    def _drained(self) -> bool:
        return time.monotonic() - self.proto.last >= IDLE


def main() -> int:
    listeners = worker.listeners()
    if not listeners:
        print("error: run me under upgraderd (no LISTEN_FDS)", file=sys.stderr)
        return 2
    return LingeringServer(listeners, FlowEcho()).serve()


if __name__ == "__main__":
    raise SystemExit(main())
