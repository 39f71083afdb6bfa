"""The end of a hand-off (END, `Taker.arriving`): real Unix and TCP sockets in one process, no daemon.

A broadcast server holds delivery while `Taker.arriving` is not 0 (config/examples/pubsub.py);
these tests pin what that count means: not 0 from a giver's first OFFER until its END, its
channel's end or its drop, whatever the number of rounds in between.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.support.channel import connect, send_fd, taker_of
from tests.support.fakes import FakeClock
from upgraderd.contract import wire
from upgraderd.worker import handoff

MASTER = 4_100_000 + os.getpid()


@pytest.fixture
def taker(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[handoff.Taker, FakeClock]]:
    yield from taker_of(MASTER, monkeypatch)


@pytest.fixture
def conns() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """Return 100 loopback TCP connections as (client, server side)."""
    with socket.create_server(("127.0.0.1", 0), backlog=128) as ls:
        pairs = []
        for _ in range(100):
            c = socket.create_connection(ls.getsockname())
            pairs.append((c, ls.accept()[0]))
    yield pairs
    for c, s in pairs:
        c.close()
        s.close()


def channel(t: handoff.Taker) -> socket.socket:
    s = connect(t)
    t.poll()
    return s


def offer(s: socket.socket, conn: socket.socket) -> None:
    send_fd(s, wire.encode_offer("web", b"", b"", b"")[0], conn.fileno())


def test_a_give_of_two_batches_is_arriving_until_its_end(taker, conns, monkeypatch):
    """100 connections go in two rounds (64 + 36): after every poll that returned some but
    not all of them, `arriving` was 1; once the give returned and END was read, it is 0."""
    t, _ = taker
    monkeypatch.setenv("UPGRADERD_GENERATION", "1")
    giver = handoff.Giver(master=MASTER, trust=lambda p, c: True)
    assert giver.find() == 1
    got: list[handoff.Handed] = []
    seen: list[tuple[int, int]] = []   # (connections arrived so far, arriving) after each poll
    done = threading.Event()

    def take() -> None:
        while not done.is_set():
            moved = t.poll()
            if moved:
                got.extend(moved)
                seen.append((len(got), t.arriving))
    th = threading.Thread(target=take)
    th.start()
    try:
        assert giver.give_many([handoff.Handed(s, "web") for _, s in conns]) == [True] * 100
    finally:
        done.set()
        th.join()
    got.extend(t.poll())   # COMMITs and END sent after the thread's last poll
    assert len(got) == 100 and t.arriving == 0
    assert seen and all(arriving == 1 for n, arriving in seen if n < 100), seen
    giver.close()
    for h in got:
        h.sock.close()


def test_end_ends_the_arrival_and_the_channel_stays_for_the_next_give(taker, conns):
    t, _ = taker
    s = channel(t)
    assert t.arriving == 0          # connected, nothing offered: nobody to wait for
    offer(s, conns[0][1])
    t.poll()
    assert s.recv(100) == wire.encode(wire.ACK, wire.TAKES_BATCHES)
    assert t.arriving == 1
    s.send(wire.encode(wire.COMMIT))
    assert len(t.poll()) == 1 and t.arriving == 1    # committed, but the give is not over
    s.send(wire.encode(wire.END))
    assert t.poll() == [] and t.arriving == 0
    offer(s, conns[1][1])           # a later give on the same channel connection
    t.poll()
    assert t.arriving == 1 and not t.failures
    s.close()


def test_a_giver_that_goes_without_end_ends_its_arrival(taker, conns):
    """A giver of an older release sends no END: its channel's end is the end."""
    t, _ = taker
    s = channel(t)
    offer(s, conns[0][1])
    t.poll()
    assert s.recv(100) == wire.encode(wire.ACK, wire.TAKES_BATCHES)
    s.send(wire.encode(wire.COMMIT))
    assert len(t.poll()) == 1 and t.arriving == 1
    s.close()
    t.poll()
    assert t.arriving == 0 and not t.failures


def test_a_stalled_giver_holds_nobody_past_the_idle_timeout(taker, conns):
    t, clock = taker
    s = channel(t)
    offer(s, conns[0][1])
    t.poll()
    s.send(wire.encode(wire.COMMIT))
    t.poll()
    assert t.arriving == 1
    clock.advance(t.idle_timeout + 0.1)
    t.poll()
    assert t.arriving == 0 and t.failures == {"idle_giver": 1}
    s.close()


def test_end_while_a_commit_is_due_is_malformed(taker, conns):
    t, _ = taker
    s = channel(t)
    offer(s, conns[0][1])
    t.poll()
    assert s.recv(100) == wire.encode(wire.ACK, wire.TAKES_BATCHES)
    s.send(wire.encode(wire.END))
    assert t.poll() == []
    assert t.failures == {"malformed": 1} and t.arriving == 0
    s.close()
