"""The hand-off channel in one process: real Unix and TCP sockets, a fake clock, no daemon."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from tests.support.channel import connect, send_fd, taker_of
from tests.support.fakes import FakeClock
from upgraderd.apps.connmetrics import HANDOFF_FAILURES
from upgraderd.contract import wire
from upgraderd.worker import giver as givermod
from upgraderd.worker import handoff, peers

# A master pid no real process has here: the channel names stay private to this test.
MASTER = 4_000_000 + os.getpid()


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Return (client, server-side) of a fresh loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as ls:
        client = socket.create_connection(ls.getsockname())
        server, _ = ls.accept()
    yield client, server
    client.close()
    server.close()


@pytest.fixture
def taker(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[handoff.Taker, FakeClock]]:
    yield from taker_of(MASTER, monkeypatch)


def closed(s: socket.socket) -> bool:
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def test_a_long_payload_is_cut_into_chunks_and_reassembled():
    state, unhandled, unsent = b"s" * 70_000, b"u" * 5, os.urandom(200_000)
    msgs = wire.encode_offer("web", state, unhandled, unsent)
    assert len(msgs) == 9 and all(len(m) <= wire.CHUNK for m in msgs)
    head, first = wire.decode_offer(msgs[0])
    body = first + b"".join(wire.data_of(m) for m in msgs[1:])
    assert (head.listener, head.state_len, head.unhandled_len, head.unsent_len) == ("web", 70_000, 5, 200_000)
    assert body == state + unhandled + unsent


def test_a_connection_moves_with_its_bytes_and_state(taker, tcp_pair, monkeypatch):
    t, _ = taker
    client, server = tcp_pair
    monkeypatch.setenv("UPGRADERD_GENERATION", "1")
    giver = handoff.Giver(master=MASTER, trust=lambda p, c: True)
    assert giver.find() == 1
    got: list[handoff.Handed] = []
    done = threading.Event()

    def take() -> None:
        while not done.is_set():
            got.extend(t.poll())
    th = threading.Thread(target=take)
    th.start()
    try:
        assert giver.give(handoff.Handed(server, "web", b"topics:a,b", b"PUB a", b"x" * 100_000))
    finally:
        done.set()
        th.join()
    server.close()  # ours no longer: the connection lives on in the taker's copy
    got.extend(t.poll())
    assert [(h.listener, h.state, h.unhandled, h.unsent) for h in got] == \
        [("web", b"topics:a,b", b"PUB a", b"x" * 100_000)]
    got[0].sock.sendall(b"from the taker")
    assert client.recv(100) == b"from the taker"
    assert giver.given == 1 and not giver.failures and not t.failures


@pytest.mark.parametrize("what", ["bad magic", "offer without fd", "offer with a pipe", "data first",
                                  "truncated offer", "two fds", "commit first"])
def test_malformed_messages_are_refused_counted_and_survived(taker, tcp_pair, what):
    t, _ = taker
    offer = wire.MAGIC + wire.OFFER + struct.pack("!HIII", 3, 0, 0, 0) + b"web"
    r, w = os.pipe()
    s = connect(t)
    t.poll()
    if what == "bad magic":
        s.send(b"hello")
    elif what == "offer without fd":
        s.send(offer)
    elif what == "offer with a pipe":
        send_fd(s, offer, r)
    elif what == "data first":
        s.send(wire.MAGIC + wire.DATA + b"x")
    elif what == "truncated offer":
        send_fd(s, wire.MAGIC + wire.OFFER + b"\0", tcp_pair[1].fileno())
    elif what == "two fds":
        s.sendmsg([offer], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("ii", r, w))])
    else:
        s.send(wire.encode(wire.COMMIT))
    assert t.poll() == []
    assert closed(s)
    assert t.failures == {"malformed": 1}
    # The taker still takes: a good offer on a new channel connection is acknowledged.
    good = connect(t)
    t.poll()
    send_fd(good, wire.encode_offer("web", b"", b"", b"")[0], tcp_pair[1].fileno())
    t.poll()
    assert good.recv(100) == wire.encode(wire.ACK, wire.TAKES_BATCHES)
    for fd in (r, w):
        os.close(fd)
    s.close()
    good.close()


def test_an_unknown_listener_is_refused_and_the_giver_keeps_the_connection(taker, tcp_pair):
    t, _ = taker
    s = connect(t)
    t.poll()
    send_fd(s, wire.encode_offer("nope", b"", b"", b"")[0], tcp_pair[1].fileno())
    assert t.poll() == []
    assert s.recv(100) == wire.encode(wire.REFUSE, "unknown_listener")


def test_a_stalled_giver_is_dropped_and_its_fd_copy_closed(taker, tcp_pair):
    t, clock = taker
    s = connect(t)
    t.poll()
    msgs = wire.encode_offer("web", b"", b"", b"y" * 100_000)
    send_fd(s, msgs[0], tcp_pair[1].fileno())  # and never the DATA that should follow
    t.poll()
    clock.advance(6)
    assert t.poll() == []
    assert t.failures == {"stalled_giver": 1}
    assert closed(s)


def test_a_commit_already_queued_when_the_taker_closes_is_kept(taker, tcp_pair):
    t, _ = taker
    s = connect(t)
    t.poll()
    send_fd(s, wire.encode_offer("web", b"st", b"", b"")[0], tcp_pair[1].fileno())
    t.poll()
    assert s.recv(100) == wire.encode(wire.ACK, wire.TAKES_BATCHES)
    s.send(wire.encode(wire.COMMIT))
    moved = t.close()
    assert [(h.listener, h.state) for h in moved] == [("web", b"st")]
    moved[0].sock.close()


def test_after_the_taker_closes_a_late_commit_fails_so_the_giver_serves_on(taker, tcp_pair):
    t, _ = taker
    s = connect(t)
    t.poll()
    send_fd(s, wire.encode_offer("web", b"", b"", b"")[0], tcp_pair[1].fileno())
    t.poll()
    assert s.recv(100) == wire.encode(wire.ACK, wire.TAKES_BATCHES)
    assert t.close() == []
    with pytest.raises(OSError):
        s.send(wire.encode(wire.COMMIT))


def test_a_giver_does_not_trust_a_taker_that_is_not_a_worker_of_its_master(taker, tcp_pair, monkeypatch):
    monkeypatch.setenv("UPGRADERD_GENERATION", "1")
    giver = handoff.Giver(master=MASTER, timeout=2)  # the default check: this process is no worker
    assert giver.find() == 0
    assert not giver.give(handoff.Handed(tcp_pair[1], "web"))
    assert giver.failures == {"untrusted_taker": 1} and giver.targets == 0


def test_a_squatted_older_name_does_not_hide_the_real_takers(taker, tcp_pair, monkeypatch):
    squatter, _ = taker  # generation 2: pretend it is a stranger's
    monkeypatch.setenv("UPGRADERD_GENERATION", "3")
    real = handoff.Taker(["web"], master=MASTER, trust=lambda p: True)
    monkeypatch.setenv("UPGRADERD_GENERATION", "1")
    giver = handoff.Giver(master=MASTER, trust=lambda p, c: c.generation == 3)
    try:
        assert giver.find() == 1
        assert giver.failures == {"untrusted_taker": 1}
        assert giver._targets[0].channel.name == real.name
    finally:
        giver.close()
        real.close()


def test_a_silent_taker_times_out_and_the_giver_keeps_the_connection(taker, tcp_pair, monkeypatch):
    monkeypatch.setenv("UPGRADERD_GENERATION", "1")
    giver = handoff.Giver(master=MASTER, timeout=0.2, trust=lambda p, c: True)
    giver.find()
    assert not giver.give(handoff.Handed(tcp_pair[1], "web"))  # the taker never polls
    assert giver.failures == {"timeout": 1}
    tcp_pair[1].sendall(b"still ours")
    assert tcp_pair[0].recv(100) == b"still ours"


def test_channel_names_are_parsed_only_for_our_master():
    assert wire.parse_name(wire.channel_name(42, 7, 3), 42) == wire.Channel(7, 3, "upgraderd-42-handoff-7-3")
    for bad in ("upgraderd-43-handoff-7-3", "upgraderd-42-handoff-x-3", "upgraderd-42-handoff-7",
                "upgraderd-42-handoff-7-3-1", "upgraderd-42-handoff-99999999999-1"):
        assert wire.parse_name(bad, 42) is None


def test_every_failure_reason_in_the_code_is_a_documented_series():
    import re
    from pathlib import Path
    src = "".join(p.read_text() for p in Path(handoff.__file__).parent.glob("*.py"))
    used = set(re.findall(r'failures\["([a-z_]+)"\]', src)) | set(re.findall(r'return "([a-z_]+)"', src))
    used |= set(re.findall(r'_drop\(inb, out, "([a-z_]+)"', src))
    assert used and used <= set(HANDOFF_FAILURES)


def test_offers_to_one_taker_are_pipelined_and_committed_in_order(taker, monkeypatch):
    t, _ = taker
    monkeypatch.setenv("UPGRADERD_GENERATION", "1")
    giver = handoff.Giver(master=MASTER, trust=lambda p, c: True)
    giver.find()
    with socket.create_server(("127.0.0.1", 0)) as ls:
        pairs = []
        for _ in range(3):
            c = socket.create_connection(ls.getsockname())
            pairs.append((c, ls.accept()[0]))
    got: list[handoff.Handed] = []
    done = threading.Event()

    def take() -> None:
        while not done.is_set():
            got.extend(t.poll())
    th = threading.Thread(target=take)
    th.start()
    try:
        moving = [handoff.Handed(s, "web", str(i).encode()) for i, (_, s) in enumerate(pairs)]
        assert giver.give_many(moving) == [True, True, True]
    finally:
        done.set()
        th.join()
    got.extend(t.poll())  # COMMITs sent after the thread's last poll
    assert [h.state for h in got] == [b"0", b"1", b"2"]
    for i, ((client, mine), h) in enumerate(zip(pairs, got)):
        mine.close()
        h.sock.sendall(b"%d" % i)
        assert client.recv(10) == b"%d" % i
        client.close()
        h.sock.close()


def test_a_refusal_in_a_batch_commits_the_acknowledged_ones_only(taker, tcp_pair, monkeypatch):
    t, _ = taker
    monkeypatch.setenv("UPGRADERD_GENERATION", "1")
    giver = handoff.Giver(master=MASTER, trust=lambda p, c: True)
    giver.find()
    got: list[handoff.Handed] = []
    done = threading.Event()

    def take() -> None:
        while not done.is_set():
            got.extend(t.poll())
    th = threading.Thread(target=take)
    th.start()
    with socket.create_server(("127.0.0.1", 0)) as ls:
        other = socket.create_connection(ls.getsockname())
        other_mine = ls.accept()[0]
    try:
        result = giver.give_many([handoff.Handed(tcp_pair[1], "web"), handoff.Handed(other_mine, "nope")])
    finally:
        done.set()
        th.join()
    got.extend(t.poll())
    assert result == [True, False]
    assert [h.listener for h in got] == ["web"]
    assert giver.failures == {"refused": 1}
    other_mine.sendall(b"kept")  # the refused one is still ours
    assert other.recv(10) == b"kept"
    other.close()
    other_mine.close()
    got[0].sock.close()


def test_a_giver_connects_to_at_most_takers_starting_at_its_own_slot(monkeypatch):
    monkeypatch.setenv("UPGRADERD_GENERATION", "2")
    takers = []
    try:
        for slot in range(givermod.TAKERS + 4):
            monkeypatch.setenv("UPGRADERD_SLOT", str(slot))
            takers.append(handoff.Taker(["web"], master=MASTER, trust=lambda p: True))
        monkeypatch.setenv("UPGRADERD_GENERATION", "1")
        monkeypatch.setenv("UPGRADERD_SLOT", "5")
        seen: list[int] = []
        # The untrusted slot 6 is skipped and one more taker is connected in its place.
        giver = handoff.Giver(master=MASTER, trust=lambda p, c: seen.append(c.slot) is None and c.slot != 6)
        try:
            assert giver.find() == givermod.TAKERS
            assert seen == [5, 6, 7, 8, 9, 10, 11, 0, 1]
            assert [t.channel.slot for t in giver._targets] == [5, 7, 8, 9, 10, 11, 0, 1]
            assert giver.failures == {"untrusted_taker": 1}
        finally:
            giver.close()
    finally:
        for t in takers:
            t.close()
