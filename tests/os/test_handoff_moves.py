"""A built-in worker's side of the hand-off (apps/moves.py) with a scripted giver and a fake clock.

The Server and its connections are real (socket pairs in a real selector); only
the other workers are replaced by `ScriptedGiver`, which answers each batch
from a script, so every path (all given, none given, retry, half-read HTTP
request) runs exactly once, without timing.
"""

from __future__ import annotations

import socket
from collections import Counter

import pytest

from tests.support.fakes import FakeClock
from upgraderd.apps import moves
from upgraderd.apps.echo import Echo
from upgraderd.apps.http import Http
from upgraderd.apps.server import Conn, Server


class ScriptedGiver:
    """A Giver whose takers accept or refuse by script, through the outboxes it opens (`ScriptedOutbox`).

    One script entry per offered connection: True taken, False refused, None no
    takers left (a timeout). The connections offered between two pumps make one batch.
    """

    def __init__(self, script: list[bool | None], targets: int = 2) -> None:
        self.script = script
        self.generation, self.slot = 1, 0
        self.failures: Counter[str] = Counter()
        self.batches: list[list[bytes]] = []
        self.finds = 0

    def find(self) -> int:
        self.finds += 1
        return 2

    def close(self) -> None:
        pass


class ScriptedOutbox:
    """The non-blocking side (worker/outbox.py) of a `ScriptedGiver`: every offer settles at the next pump."""

    def __init__(self, giver: ScriptedGiver) -> None:
        self.giver, self.targets, self.given = giver, 2, 0
        self.failures: Counter[str] = Counter()
        self.offered: list[int] = []

    def fileno(self) -> int:
        return self.giver.sink.fileno()

    def has_room(self) -> bool:
        return self.targets > 0

    def offer(self, key: int, moving) -> bool:
        if not self.offered:
            self.giver.batches.append([])
        self.giver.batches[-1].append(moving.unsent)
        self.offered.append(key)
        return True

    def pump(self) -> tuple[list[int], list[int]]:
        done, back = [], []
        for key in self.offered:
            answer = self.giver.script.pop(0)
            if answer is None:
                self.targets = 0
                self.failures["timeout"] += 1
            (done if answer and self.targets else back).append(key)
        self.offered = []
        self.given += len(done)
        return done, back

    def close(self) -> list[int]:
        back, self.offered = self.offered, []
        return back


@pytest.fixture
def pairs():
    made: list[socket.socket] = []

    def make() -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        made.extend((a, b))
        return a, b
    yield make
    for s in made:
        s.close()


def server_with(giver: ScriptedGiver, clock: FakeClock, protos: list, pairs) -> tuple[Server, list]:
    listener = socket.create_server(("127.0.0.1", 0))  # named only: this Server never serves
    server = Server({"echo": listener}, lambda name: Echo())
    giver.sink = pairs()[0]  # an fd the loop can watch (closed with the pairs)
    server.moves = moves.Moves(server, take=False, giver=lambda: giver, clock=clock, outbox=ScriptedOutbox)
    clients = []
    for proto in protos:
        client, mine = pairs()
        mine.setblocking(False)
        conn = Conn(mine, proto, "echo")
        conn.out += b"pending"
        server.track(conn)
        clients.append((client, conn))
    listener.close()
    return server, clients


def test_every_connection_given_is_forgotten_and_its_copy_closed(pairs):
    giver, clock = ScriptedGiver([True, True]), FakeClock()
    server, clients = server_with(giver, clock, [Echo(), Echo()], pairs)
    server.moves.start_giving()
    assert server.conns == {}
    assert all(conn.sock.fileno() < 0 for _, conn in clients)
    assert giver.batches == [[b"pending", b"pending"]]  # the unsent output moved with them
    assert server.metrics.active("echo") == -2  # none accepted here, two handed off


def test_a_connection_nobody_takes_is_served_on_drained_and_offered_again_later(pairs):
    giver, clock = ScriptedGiver([True, None, True]), FakeClock()
    server, clients = server_with(giver, clock, [Echo(), Http("echo")], pairs)
    server.moves.start_giving()
    (left,) = server.conns.values()
    assert left.stay and left.proto.draining  # drained as without hand-off: Connection: close next
    (client,) = [c for c, conn in clients if conn is left]
    client.send(b"x")
    assert left.sock.fileno() in dict(server.ep.poll(5))  # back in the loop, reading
    clock.advance(moves.RETRY - 0.1)
    server.moves.give_ready()
    assert giver.finds == 1 and len(giver.batches) == 1  # not yet
    clock.advance(0.2)
    server.moves.give_ready()
    assert giver.finds == 2 and server.conns == {}


def test_a_half_read_http_request_is_answered_before_the_connection_moves(pairs):
    giver, clock = ScriptedGiver([True]), FakeClock()
    http = Http("echo")
    server, clients = server_with(giver, clock, [http], pairs)
    (client, conn), = clients
    conn.out.clear()
    http.received(b"GET / HTTP/1.1\r\nHost: x\r\n")  # no blank line yet
    server.moves.start_giving()
    assert giver.batches == [] and server.conns  # not while the request is half read
    assert not conn.stay
    conn.out += http.received(b"\r\n")  # the request completes and is answered (keep-alive)
    assert b"Connection: keep-alive" in conn.out
    server.moves.give_ready()
    assert giver.batches == [[bytes(conn.out)]] and server.conns == {}


def test_at_the_masters_stop_nothing_is_offered_and_every_connection_drains(pairs, tmp_path, monkeypatch):
    """The stop marker (contract/wire.py) is there: no taker is looked for, now or RETRY later."""
    (tmp_path / "stopping").touch()
    monkeypatch.setenv("UPGRADERD_HANDOFF_DIR", str(tmp_path))
    giver, clock = ScriptedGiver([], targets=0), FakeClock()
    server, clients = server_with(giver, clock, [Echo(), Http("echo")], pairs)
    server.moves.start_giving()
    assert giver.finds == 0 and giver.batches == []
    assert len(server.conns) == 2 and all(c.stay for c in server.conns.values())
    assert all(c.proto.draining for c in server.conns.values() if isinstance(c.proto, Http))
    clock.advance(moves.RETRY + 1)
    server.moves.give_ready()
    assert giver.finds == 0 and len(server.conns) == 2


def test_movable_is_decided_per_class_as_the_protocol_says():
    class Moves:
        def handoff_state(self) -> tuple[bytes, bytes] | None:
            return b"", b""

        def restore(self, state: bytes) -> None:
            pass

    class Stays:
        def handoff_state(self) -> tuple[bytes, bytes] | None:
            return None

    assert moves.movable(Moves()) and moves.movable(Moves())
    assert not moves.movable(Stays()) and not moves.movable(object())
    assert moves._MOVABLE[Moves] is True and moves._MOVABLE[Stays] is False
