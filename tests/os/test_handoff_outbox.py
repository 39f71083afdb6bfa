"""The non-blocking giver (worker/outbox.py) against real takers in one process: real Unix
sockets, a fake clock, no daemon, no thread. The test plays the loops of both sides by
turns, so every answer arrives only when the taker's loop runs."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from tests.support.fakes import FakeClock
from upgraderd.contract import wire
from upgraderd.worker import handoff
from upgraderd.worker.outbox import WINDOW, Outbox

MASTER = 4_100_000 + os.getpid()   # a master pid no real process has: the channel names stay private


@pytest.fixture
def takers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[handoff.Taker]]:
    made = []
    for slot in (0, 1):
        monkeypatch.setenv("UPGRADERD_GENERATION", "2")
        monkeypatch.setenv("UPGRADERD_SLOT", str(slot))
        made.append(handoff.Taker(["web"], master=MASTER, trust=lambda p: True))
    monkeypatch.setenv("UPGRADERD_GENERATION", "1")   # the giver: slot 0 of generation 1, so its
    monkeypatch.setenv("UPGRADERD_SLOT", "0")         # first lane is slot 0's taker (worker/giver.py)
    yield made
    for t in made:
        t.close()


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """600 connections: (client end, our end), more than two takers take in one window."""
    made = [socket.socketpair() for _ in range(600)]
    yield made
    for a, b in made:
        a.close()
        b.close()


def offer_all(box: Outbox, pairs: list[tuple[socket.socket, socket.socket]], left: list[int]) -> None:
    while left and box.has_room():
        i = left[0]
        assert box.offer(i, handoff.Handed(pairs[i][1], "web", b"", b"", b"unsent %d" % i))
        left.pop(0)


def test_every_connection_moves_in_batches_while_the_takers_answer_in_their_own_time(takers, pairs):
    clock = FakeClock(10.0)
    giver = handoff.Giver(master=MASTER, trust=lambda p, c: True, clock=clock)
    assert giver.find() == 2
    box = Outbox(giver, clock=clock)
    left, given, taken = list(range(len(pairs))), [], {0: [], 1: []}
    for _ in range(100):
        offer_all(box, pairs, left)
        assert box.in_flight <= 2 * WINDOW   # flow control: no taker is sent more than it can answer
        done, back = box.pump()
        assert back == []
        given += done
        for n, t in enumerate(takers):
            taken[n] += t.poll()
        if len(given) == len(pairs) and sum(map(len, taken.values())) == len(pairs):
            break
    assert sorted(given) == list(range(len(pairs))) and box.in_flight == 0 and box.given == len(pairs)
    assert len(taken[0]) == len(taken[1]) == len(pairs) // 2   # round-robin over both
    moved = {m.unsent: m for ms in taken.values() for m in ms}
    assert set(moved) == {b"unsent %d" % i for i in range(len(pairs))}
    pairs[7][0].send(b"ping")
    assert moved[b"unsent 7"].sock.recv(4) == b"ping"   # the taker's copy is the same connection
    for m in moved.values():
        m.sock.close()
    box.close()


def test_a_silent_taker_gives_back_what_it_held_after_the_timeout_and_the_other_takes_the_rest(takers, pairs):
    clock = FakeClock(10.0)
    giver = handoff.Giver(master=MASTER, trust=lambda p, c: True, clock=clock)
    giver.find()
    box = Outbox(giver, timeout=5.0, clock=clock)
    left = list(range(2 * WINDOW))
    offer_all(box, pairs, left)
    assert left == [] and not box.has_room()
    done, adopted = [], []
    for _ in range(50):   # only the first taker's loop runs; the second's never does
        adopted += takers[0].poll()
        got, back = box.pump()
        assert back == []
        done += got
        if len(done) == WINDOW and len(adopted) == WINDOW:
            break
    assert box.in_flight == WINDOW          # the silent taker's offers wait...
    clock.advance(5.1)
    late, back = box.pump()                # ...until the timeout: back to serve on, nothing lost
    assert sorted(back) == list(range(1, 2 * WINDOW, 2)) and box.failures == {"timeout": 1}
    assert box.targets == 1 and box.in_flight == 0 and late == []
    assert sorted(done) == list(range(0, 2 * WINDOW, 2))
    for m in adopted:
        m.sock.close()
    box.close()


def test_a_draining_taker_refuses_and_its_offers_come_back(takers, pairs):
    clock = FakeClock(10.0)
    giver = handoff.Giver(master=MASTER, trust=lambda p, c: True, clock=clock)
    giver.find()
    box = Outbox(giver, clock=clock)
    offer_all(box, pairs, [0, 1, 2, 3])
    box.pump()
    takers[1].accepting = False    # it drains: it refuses every offer
    takers[1].poll()               # accepts our channel connection
    takers[1].poll()               # reads the offers, refuses them
    done, back = box.pump()
    assert sorted(back) == [1, 3] and box.failures["refused"] == 1 and box.targets == 1 and done == []
    assert box.close() == [0, 2]   # offered to the other taker, never committed: still ours


def test_large_connections_never_put_more_bytes_in_flight_than_a_taker_holds_for_one_giver(takers):
    """Three connections of 7 MiB each (the taker holds 16 MiB per giver): the outbox waits for
    room rather than sending the third, which made the taker drop the giver as malformed."""
    giver = handoff.Giver(master=MASTER, trust=lambda p, c: True)
    assert giver.aim([wire.Channel(2, 0, takers[0].name)]) == 1
    box = Outbox(giver)
    pairs = [socket.socketpair() for _ in range(3)]
    left, given, got = [0, 1, 2], [], []
    try:
        for _ in range(20_000):
            while left and box.has_room() and \
                    box.offer(left[0], handoff.Handed(pairs[left[0]][1], "web", b"", b"", b"z" * (7 << 20))):
                left.pop(0)
            done, back = box.pump()
            assert back == []
            given += done
            got += takers[0].poll()
            if len(got) == 3:
                break
        assert sorted(given) == [0, 1, 2] and takers[0].failures == {}
        assert [len(h.unsent) for h in got] == [7 << 20] * 3
    finally:
        box.close()
        for h in got:
            h.sock.close()
        for a, b in pairs:
            a.close()
            b.close()
