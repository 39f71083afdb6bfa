"""Batched hand-off (contract/wire.py BATCH): many connections per message, only to takers that
say they take them, taken or refused whole. Real Unix and TCP sockets in one process, no daemon."""

from __future__ import annotations

import array
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.support.channel import connect, taker_of
from tests.support.fakes import FakeClock
from upgraderd.contract import wire
from upgraderd.worker import handoff
from upgraderd.worker.outbox import WINDOW, Outbox

MASTER = 4_200_000 + os.getpid()   # a master pid no real process has: the channel names stay private

BATCH_ACK = wire.encode(wire.ACK, wire.TAKES_BATCHES)


@pytest.fixture
def taker(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[handoff.Taker, FakeClock]]:
    yield from taker_of(MASTER, monkeypatch)


@pytest.fixture
def tcp_pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """300 loopback TCP connections: (client end, our end)."""
    made = []
    with socket.create_server(("127.0.0.1", 0), backlog=512) as ls:
        for _ in range(300):
            client = socket.create_connection(ls.getsockname())
            made.append((client, ls.accept()[0]))
    yield made
    for a, b in made:
        a.close()
        b.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def send_batch(s: socket.socket, entries: list[bytes], fds: list[int]) -> None:
    s.sendmsg([wire.encode_batch(entries)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def entry(listener: str, i: int) -> bytes:
    made = wire.batch_entry(listener, b"state %d" % i, b"", b"unsent %d" % i)
    assert made is not None
    return made


def test_a_batch_round_trips_and_a_damaged_one_is_malformed():
    entries = [wire.batch_entry("web", b"s%d" % i, b"u", b"x" * i) for i in range(3)]
    assert all(e is not None for e in entries)
    msg = wire.encode_batch([e for e in entries if e is not None])
    got = wire.decode_batch(msg)
    assert [(h.listener, h.state_len, h.unhandled_len, h.unsent_len, p) for h, p in got] == \
        [("web", 2, 1, i, b"s%d" % i + b"u" + b"x" * i) for i in range(3)]
    for bad in (msg[:-1], msg + b"!", msg[:len(wire.MAGIC) + 2], wire.encode_batch([])):
        with pytest.raises(wire.Malformed):
            wire.decode_batch(bad)
    assert wire.batch_entry("web", b"", b"", b"x" * wire.CHUNK) is None   # goes as an OFFER with DATA
    assert not wire.batch_fits(0, wire.MAX_BATCH, entries[0] or b"")


def test_an_outbox_moves_hundreds_of_connections_in_batches_once_the_taker_says_it_takes_them(taker, tcp_pairs,
                                                                                            monkeypatch):
    t, _ = taker
    monkeypatch.setenv("UPGRADERD_GENERATION", "1")
    giver = handoff.Giver(master=MASTER, trust=lambda p, c: True)
    assert giver.find() == 1
    box = Outbox(giver)
    left, given, got = list(range(len(tcp_pairs))), [], []
    for _ in range(200):
        while left and box.has_room():
            i = left.pop(0)
            assert box.offer(i, handoff.Handed(tcp_pairs[i][1], "web", b"state %d" % i, b"", b"unsent %d" % i))
        done, back = box.pump()
        assert back == []
        given += done
        got += t.poll()
        if len(got) == len(tcp_pairs):
            break
    assert sorted(given) == list(range(len(tcp_pairs)))
    assert [(h.listener, h.state, h.unsent) for h in got] == \
        [("web", b"state %d" % i, b"unsent %d" % i) for i in range(len(tcp_pairs))]
    # The first window goes as single offers (OFFER, COMMIT each); the rest as batches of up to
    # WINDOW (BATCH, COMMIT each). Single offers all the way would take 2 messages per connection.
    rest = len(tcp_pairs) - WINDOW
    assert t.messages <= 2 * WINDOW + 2 * (rest // wire.MAX_BATCH + 4), t.messages
    for i in (0, 150, 299):   # each moved socket is the very connection the client holds
        tcp_pairs[i][0].sendall(b"ping %d" % i)
        got[i].sock.settimeout(5)
        assert got[i].sock.recv(100) == b"ping %d" % i
    for h in got:
        h.sock.close()


def old_taker(path: str, seen: list[tuple[bytes, int]], stop: threading.Event) -> threading.Thread:
    """Serve a channel as a taker of the previous release does: a plain ACK to each offer, COMMITs
    read; record each message's kind and how many fds came with it."""
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ls.bind(wire.address(path))
    ls.listen(8)
    ls.settimeout(5)

    def run() -> None:
        with ls:
            conn, _ = ls.accept()
            with conn:
                conn.settimeout(0.2)
                while not stop.is_set():
                    try:
                        msg, anc, _, _ = conn.recvmsg(wire.RECV_SIZE, socket.CMSG_SPACE(wire.MAX_BATCH * 4))
                    except socket.timeout:
                        continue
                    if not msg:
                        return
                    fds = array.array("i")
                    for _, _, data in anc:
                        fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                    for fd in fds:
                        os.close(fd)
                    seen.append((wire.kind_of(msg), len(fds)))
                    if wire.kind_of(msg) == wire.OFFER:
                        conn.send(wire.encode(wire.ACK))
    th = threading.Thread(target=run)
    th.start()
    return th


@pytest.mark.parametrize("blocking", [True, False], ids=["give_many", "outbox"])
def test_a_taker_that_does_not_say_it_takes_batches_gets_single_offers_only(tcp_pairs, monkeypatch, tmp_path,
                                                                           blocking):
    monkeypatch.setenv("UPGRADERD_GENERATION", "1")
    channel = wire.Channel(2, 0, str(tmp_path / "handoff-2-0"))
    seen: list[tuple[bytes, int]] = []
    stop = threading.Event()
    th = old_taker(channel.name, seen, stop)
    try:
        giver = handoff.Giver(master=MASTER, trust=lambda p, c: True)
        assert giver.aim([channel]) == 1
        moving = [handoff.Handed(b, "web", b"st", b"", b"") for _, b in tcp_pairs[:200]]
        if blocking:
            assert giver.give_many(moving) == [True] * len(moving)
        else:
            box = Outbox(giver)
            left, given = list(range(len(moving))), []
            for _ in range(500):
                while left and box.has_room():
                    i = left.pop(0)
                    assert box.offer(i, moving[i])
                done, back = box.pump()
                assert back == []
                given += done
                if len(given) == len(moving):
                    break
                select_readable(box.fileno())
            assert sorted(given) == list(range(len(moving)))
    finally:
        stop.set()
        th.join()
    offers = [n for kind, n in seen if kind == wire.OFFER]
    assert len(offers) == len(moving) and set(offers) == {1}
    assert {kind for kind, _ in seen} <= {wire.OFFER, wire.COMMIT, wire.END}


def select_readable(fd: int) -> None:
    import select
    select.select([fd], [], [], 1.0)


def test_a_batch_is_taken_or_refused_whole_and_committed_by_one_commit(taker, tcp_pairs):
    t, _ = taker
    s = connect(t)
    assert t.poll() == []   # accepts the giver
    before = open_fds()
    ours = [b for _, b in tcp_pairs[:5]]
    send_batch(s, [entry("web", 0), entry("web", 1), entry("nope", 2)], [b.fileno() for b in ours[:3]])
    assert t.poll() == []
    assert s.recv(100) == wire.encode(wire.REFUSE, "unknown_listener")
    assert open_fds() == before   # none of the three copies is kept
    send_batch(s, [entry("web", i) for i in range(5)], [b.fileno() for b in ours])
    assert t.poll() == []
    assert s.recv(100) == BATCH_ACK
    assert open_fds() == before + 5
    s.send(wire.encode(wire.COMMIT))
    got = t.poll()
    assert [(h.listener, h.state, h.unsent) for h in got] == [("web", b"state %d" % i, b"unsent %d" % i)
                                                            for i in range(5)]
    assert t.failures == {}
    for h in got:
        h.sock.close()
    s.close()


def test_a_batch_whose_fds_do_not_match_drops_the_giver_and_keeps_no_fd(taker, tcp_pairs):
    t, _ = taker
    s = connect(t)
    assert t.poll() == []   # accepts the giver
    before = open_fds()
    send_batch(s, [entry("web", i) for i in range(3)], [b.fileno() for _, b in tcp_pairs[:2]])
    assert t.poll() == []
    assert t.failures["malformed"] == 1
    assert s.recv(100) == b""   # the channel is closed
    assert open_fds() == before - 1   # our channel socket's peer is gone from the taker; no copy kept
    s.close()


def test_a_dropped_giver_whose_batch_commit_is_queued_hands_the_whole_batch(taker, tcp_pairs):
    t, clock = taker
    s = connect(t)
    assert t.poll() == []   # accepts the giver
    ours = [b for _, b in tcp_pairs[:4]]
    send_batch(s, [entry("web", i) for i in range(4)], [b.fileno() for b in ours])
    assert t.poll() == [] and s.recv(100) == BATCH_ACK
    s.send(wire.encode(wire.COMMIT))
    s.close()   # gone right after its COMMIT: the taker still owns the batch
    got = t.poll()
    assert [h.state for h in got] == [b"state %d" % i for i in range(4)]
    for h in got:
        h.sock.close()
