"""The `flows: cookie` program on a real SO_REUSEPORT UDP group (no daemon).

The test plays the master: generation 1's sockets, then generation 2's, in
one pool; generation 1 is parked (draining), then its sockets go back to the
pool and generation 3 takes them. A datagram that starts with a live owner's
cookie lands on that socket; any other lands on the ACTIVE generation's
sockets; no socket closes while a later one of the group is open.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Iterator

import pytest

from upgraderd.config import schema
from upgraderd.config.schema import Config
from upgraderd.core.seams import key_for, keys_for
from upgraderd.system import cookiepool, flowcookie
from tests.support.udpload import free_udp_port
from upgraderd.system.sockets import ListenerSet



@pytest.fixture
def rig() -> Iterator[tuple[ListenerSet, Config]]:
    cfg = schema.parse(f"listeners:\n  - {{name: game, port: {free_udp_port()}, protocol: udp, flows: cookie}}\n"
                       "workers: {count: 2, command: [/bin/true]}\n")
    ls = ListenerSet()
    assert ls.ensure(cfg) == []   # nothing before a generation starts
    yield ls, cfg
    ls.close_all()


def socks(ls: ListenerSet, cfg: Config, gen: int) -> dict[tuple[int, int], socket.socket]:
    out = {}
    for slot in (0, 1):
        s = socket.socket(fileno=os.dup(ls.child_fds(cfg, slot, gen)[0]))
        s.setblocking(False)
        out[(gen, slot)] = s
    return out


def where(port: int, readers: dict[tuple[int, int], socket.socket], heads: list[bytes]) -> list[set[tuple[int, int]]]:
    """Send each of `heads` from 20 source ports; return, per head, the sockets that got them."""
    out = []
    for head in heads:
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(20)]
        for c in clients:
            c.sendto(head + b"payload", ("127.0.0.1", port))
        got: set[tuple[int, int]] = set()
        n, deadline = 0, time.monotonic() + 5
        while n < 20 and time.monotonic() < deadline:
            for who, s in readers.items():
                try:
                    while s.recv(64):
                        got.add(who)
                        n += 1
                except BlockingIOError:
                    pass
        assert n == 20, f"{n} of 20 datagrams for {head!r} arrived"
        out.append(got)
        for c in clients:
            c.close()
    return out


def pool_key(port: int, index: int) -> tuple[str, int, str, int]:
    return ("127.0.0.1", port, cookiepool.MODE, index)


def test_cookies_stick_to_their_generation_and_its_sockets_go_back_to_the_pool(rig):
    ls, cfg = rig
    port = cfg.listeners[0].port
    spec = cfg.listeners[0]
    readers = socks(ls, cfg, 1)
    assert key_for(spec, 1, 1) == ("127.0.0.1", port, "udp/cookie@1", 1)
    assert ls.keys() == {pool_key(port, 0), pool_key(port, 1)}
    assert ls.steer(cfg, [0, 1], 1) is None
    readers |= socks(ls, cfg, 2)                          # generation 2 starts: 4 sockets, appended
    assert ls.keys() == {pool_key(port, i) for i in range(4)}
    new, c10, c11, c21, short = b"\0\0\0\0", flowcookie.cookie(1, 0), flowcookie.cookie(1, 1), \
        flowcookie.cookie(2, 1), b"\1"
    assert where(port, readers, [new, c10]) == [{(1, 0), (1, 1)}, {(1, 0)}]
    assert ls.steer(cfg, [0, 1], 2) is None               # generation 2 is ACTIVE
    done = ls.retire(keys_for(cfg, [0, 1], 2), held=keys_for(cfg, [0, 1], 1))
    assert sorted(done.parked) == [pool_key(port, 0), pool_key(port, 1)] and done.closed == []
    assert where(port, readers, [new, c10, c11, c21]) == [{(2, 0), (2, 1)}, {(1, 0)}, {(1, 1)}, {(2, 1)}]
    # Generation 1's workers exit (their fds close): its sockets go back to the pool, open and
    # at their index (2 free, 2 owned: none closes), and its cookies leave the program.
    fd10 = ls.fileno_of(pool_key(port, 0))
    for gen_slot in [(1, 0), (1, 1)]:
        readers.pop(gen_slot).close()
    done = ls.retire(keys_for(cfg, [0, 1], 2), held=keys_for(cfg, [0, 1], 2))
    assert done.closed == [] and done.parked == [] and len(ls.keys()) == 4
    got = where(port, readers, [new, c10, c21, short])
    assert got[0] == got[1] == got[3] == {(2, 0), (2, 1)}
    assert got[2] == {(2, 1)}
    # Generation 3 takes the free sockets: slot 0 gets index 0, generation 1's slot 0 socket.
    readers |= socks(ls, cfg, 3)
    assert ls.fileno_of(pool_key(port, 0)) == fd10 == ls.child_fds(cfg, 0, 3)[0]
    assert len(ls.keys()) == 4
    assert ls.steer(cfg, [0, 1], 3) is None
    c30, c20 = flowcookie.cookie(3, 0), flowcookie.cookie(2, 0)
    assert where(port, readers, [new, c30, c20, c10]) == [{(3, 0), (3, 1)}, {(3, 0)}, {(2, 0)}, {(3, 0), (3, 1)}]
    # Generation 3 retires too, with generation 2 ACTIVE again: 2 free, 2 owned, none closes.
    for gen_slot in [(3, 0), (3, 1)]:
        readers.pop(gen_slot).close()
    assert ls.steer(cfg, [0, 1], 2) is None
    assert ls.retire(keys_for(cfg, [0, 1], 2), held=set()).closed == []
    # Nothing owned: the free sockets close, from the end of the group, and nothing moves.
    done = ls.retire(set(), held=set())
    assert done.closed == [pool_key(port, i) for i in (3, 2, 1, 0)] and ls.keys() == set()


def test_only_free_sockets_at_the_end_close(rig):
    ls, cfg = rig
    port = cfg.listeners[0].port
    readers = socks(ls, cfg, 1) | socks(ls, cfg, 2)       # indices 0, 1 (gen 1) and 2, 3 (gen 2)
    assert ls.steer(cfg, [0, 1], 1) is None
    # Generation 2 goes (its workers failed, say) while generation 1 stays: its sockets at the
    # end are free, 2 free for 2 owned, so they stay for the next generation.
    assert ls.retire(keys_for(cfg, [0, 1], 1), held=set()).closed == []
    # Generation 1 shrinks to slot 0: 3 free, 1 owned; the free ones at the end close, last first.
    done = ls.retire(keys_for(cfg, [0], 1), held=set())
    assert done.closed == [pool_key(port, 3), pool_key(port, 2)]
    assert ls.keys() == {pool_key(port, 0), pool_key(port, 1)}
    c10 = flowcookie.cookie(1, 0)
    readers = {k: v for k, v in readers.items() if k == (1, 0)}
    assert where(port, readers, [c10, b"\0\0\0\0"]) == [{(1, 0)}, {(1, 0)}]


def test_a_reexec_carries_the_pool_and_its_owners(rig):
    ls, cfg = rig
    port = cfg.listeners[0].port
    readers = socks(ls, cfg, 1) | socks(ls, cfg, 2)       # indices 0, 1 (gen 1) and 2, 3 (gen 2)
    for gen_slot in [(1, 0), (1, 1)]:
        readers.pop(gen_slot).close()
    assert ls.retire(keys_for(cfg, [0, 1], 2), held=set()).closed == []   # 0 and 1 are free
    heir = ListenerSet()
    heir.adopt([{**e, "fd": os.dup(e["fd"])} for e in ls.export()])
    ls.close_all()                                # the old master's fds; the heir's dups keep the group
    try:
        assert heir.keys() == {pool_key(port, i) for i in range(4)}
        assert heir.child_fds(cfg, 1, 2) == (heir.fileno_of(pool_key(port, 3)),)   # still gen 2's
        readers |= socks(heir, cfg, 3)                                            # takes 0 and 1
        assert heir.child_fds(cfg, 0, 3) == (heir.fileno_of(pool_key(port, 0)),)
        assert heir.steer(cfg, [0, 1], 3) is None
        c21, c31 = flowcookie.cookie(2, 1), flowcookie.cookie(3, 1)
        assert where(port, readers, [c21, c31, b"\0\0\0\0"]) == [{(2, 1)}, {(3, 1)}, {(3, 0), (3, 1)}]
    finally:
        heir.close_all()


def test_program_layout():
    prog = flowcookie.program({flowcookie.cookie_value(3, 1): 2}, [0, 1])
    assert prog[0] == (flowcookie.BPF_LD_W_LEN, 0, 0, 0)
    assert prog[1] == (flowcookie.BPF_JGE_K, 1, 0, 4)
    assert prog[2] == (flowcookie.BPF_JA, 0, 0, 3)          # over ld and the 2-instruction table
    assert prog[4][3] == (3 << 16) | 1 and prog[5][3] == 2
