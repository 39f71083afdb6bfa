"""UDP listeners on real sockets (no daemon): binding, steering, adoption, export, conflicts."""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Iterator

import pytest

from upgraderd.config import schema
from upgraderd.config.schema import Config
from upgraderd.core.seams import key_for
from upgraderd.errors import FatalError
from upgraderd.system import activation, conflict, udp
from tests.support.udpload import free_udp_port
from upgraderd.system.sockets import ListenerSet

DATAGRAMS = 90


def config(port: int, count: int, mode: str = "reuseport", tcp_too: bool = False) -> Config:
    extra = f"  - {{name: dns-tcp, port: {port}, mode: {mode}}}\n" if tcp_too else ""
    return schema.parse(f"listeners:\n  - {{name: dns, port: {port}, protocol: udp, mode: {mode}}}\n{extra}"
                        f"workers: {{count: {count}, app: echo}}\n")


@pytest.fixture
def group() -> Iterator[tuple[ListenerSet, Config]]:
    ls = ListenerSet()
    cfg = config(free_udp_port(), 3)
    ls.ensure(cfg)
    yield ls, cfg
    ls.close_all()


def slot_socks(ls: ListenerSet, cfg: Config, slots: range) -> dict[int, socket.socket]:
    """Dups of the slot sockets, as workers hold them (the first fd is the UDP listener)."""
    out = {}
    for slot in slots:
        s = socket.socket(fileno=os.dup(ls.child_fds(cfg, slot)[0]))
        s.setblocking(False)
        out[slot] = s
    return out


def spread(port: int, socks: dict[int, socket.socket], n: int = DATAGRAMS) -> dict[int, int]:
    """Send `n` datagrams from `n` source ports; return how many each slot socket received."""
    got = {slot: 0 for slot in socks}
    clients = []
    for i in range(n):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.sendto(b"%d" % i, ("127.0.0.1", port))
        clients.append(c)
    deadline = time.monotonic() + 5
    while sum(got.values()) < n and time.monotonic() < deadline:
        for slot, s in socks.items():
            try:
                while s.recv(64):
                    got[slot] += 1
            except BlockingIOError:
                pass
    for c in clients:
        c.close()
    return got


def test_reuseport_binds_one_datagram_socket_per_slot_with_the_drop_counter_on(group):
    ls, cfg = group
    fds = [ls.child_fds(cfg, slot)[0] for slot in range(3)]
    assert len(set(fds)) == 3
    for fd in fds:
        with socket.socket(fileno=os.dup(fd)) as s:
            assert s.type == socket.SOCK_DGRAM
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert s.getsockopt(socket.SOL_SOCKET, udp.SO_RXQ_OVFL) == 1
            assert s.getsockname() == ("127.0.0.1", cfg.listeners[0].port)
    # A reload of the same config binds nothing and keeps every fd.
    assert ls.ensure(config(cfg.listeners[0].port, 3)) == []
    assert [ls.child_fds(cfg, slot)[0] for slot in range(3)] == fds


def test_shared_mode_is_one_socket_and_tcp_on_the_same_port_is_its_own_group():
    ls = ListenerSet()
    cfg = config(free_udp_port(), 3, mode="shared", tcp_too=True)
    try:
        opened = ls.ensure(cfg)
        assert sorted(k[2] for k in opened) == ["shared", "udp/shared"]
        assert len({ls.child_fds(cfg, slot) for slot in range(3)}) == 1
        dgram, stream = ls.child_fds(cfg, 0)
        with socket.socket(fileno=os.dup(dgram)) as d, socket.socket(fileno=os.dup(stream)) as t:
            assert (d.type, t.type) == (socket.SOCK_DGRAM, socket.SOCK_STREAM)
        # Steering both groups: each gets its own program, neither is refused.
        assert ls.steer(cfg, [0]) is None and ls.is_steered(cfg) and ls.steer_refused == 0
    finally:
        ls.close_all()


def test_without_steering_datagrams_spread_over_every_slot(group):
    ls, cfg = group
    socks = slot_socks(ls, cfg, range(3))
    counts = spread(cfg.listeners[0].port, socks)
    assert sum(counts.values()) == DATAGRAMS
    assert {s for s, n in counts.items() if n} == {0, 1, 2}


@pytest.mark.parametrize("ready", [{0, 1}, {2}, {0, 2}])
def test_steering_sends_datagrams_only_to_ready_slots(group, ready):
    ls, cfg = group
    assert ls.steer(cfg, ready) is None and ls.is_steered(cfg)
    socks = slot_socks(ls, cfg, range(3))
    counts = spread(cfg.listeners[0].port, socks)
    assert sum(counts.values()) == DATAGRAMS
    assert {s for s, n in counts.items() if n} == ready


def test_a_retired_udp_slot_leaves_the_group_and_steering_follows(group):
    ls, cfg = group
    assert ls.steer(cfg, {0, 1, 2}) is None
    done = ls.retire({key_for(cfg.listeners[0], s) for s in (1, 2)})
    assert done.closed == [key_for(cfg.listeners[0], 0)]
    assert ls.steer(cfg, {1, 2}) is None
    socks = slot_socks(ls, cfg, range(1, 3))
    counts = spread(cfg.listeners[0].port, socks)
    assert sum(counts.values()) == DATAGRAMS and counts[1] and counts[2]


def test_export_and_adopt_keep_the_datagram_sockets(group):
    ls, cfg = group
    entries = ls.export()
    dups = [{**e, "fd": os.dup(e["fd"])} for e in entries]
    other = ListenerSet()
    try:
        other.adopt(dups)
        assert other.keys() == ls.keys()
        socks = slot_socks(other, cfg, range(3))
        assert all(s.type == socket.SOCK_DGRAM for s in socks.values())
        assert other.steer(cfg, {1}) is None
        counts = spread(cfg.listeners[0].port, socks, 30)
        assert counts == {0: 0, 1: 30, 2: 0}
    finally:
        other.close_all()


def test_passed_sockets_are_matched_by_type():
    port = free_udp_port()
    cfg = config(port, 1)
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", port))
        tcp.listen()
        with pytest.raises(FatalError, match=r"is not a UDP/IPv4 socket, but listener 'dns'"):
            activation.match(cfg, [activation.Passed(3, "dns", tcp)], activation.Adopted())
    dgram = udp.bind(cfg.listeners[0])
    into = activation.Adopted()
    activation.match(cfg, [activation.Passed(3, "dns", dgram)], into)
    assert list(into.sockets) == [("127.0.0.1", port, "udp/reuseport", 0)]
    ls = ListenerSet()
    try:
        ls.adopt_listening(cfg, {k: s for k, (s, _) in into.sockets.items()})
        assert ls.ensure(cfg) == []  # the adopted socket serves slot 0; nothing re-bound
    finally:
        ls.close_all()


def test_the_peer_check_lists_udp_sockets_apart_from_tcp_ones():
    port = free_udp_port()
    with udp.bind(config(port, 1).listeners[0]) as s:
        inode = os.fstat(s.fileno()).st_ino
        assert (port, inode) in {(p, i) for _a, p, i in conflict.listening("udp")}
        assert port not in {p for _a, p, _i in conflict.listening("tcp")}
        assert (port, inode) in {(p, i) for _a, p, i in
                                 conflict._proc_listening(("/proc/net/udp",), conflict.UNCONNECTED)}


def test_a_close_in_a_worker_leaves_the_socket_whole_where_shutdown_would_not(group):
    """Why a draining worker only closes its fd: SHUT_RD marks the socket every holder shares."""
    ls, cfg = group
    port = cfg.listeners[0].port
    master_fd = ls.child_fds(cfg, 0)[0]
    assert ls.steer(cfg, {0}) is None
    worker = socket.socket(fileno=os.dup(master_fd))
    worker.close()                                      # what a draining worker does
    with socket.socket(fileno=os.dup(master_fd)) as successor:
        successor.setblocking(False)
        assert select.select([successor], [], [], 0)[0] == []  # nothing queued, nothing reported
        assert spread(port, {0: successor}, 10) == {0: 10}
        stray = socket.socket(fileno=os.dup(master_fd))
        with pytest.raises(OSError):
            stray.shutdown(socket.SHUT_RD)                  # ENOTCONN, but the flag is set
        stray.close()
        assert select.select([successor], [], [], 0)[0] == [successor]  # readable forever ...
        with pytest.raises(BlockingIOError):
            successor.recv(64)                                  # ... with nothing to read
