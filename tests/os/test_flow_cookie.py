"""The `flows: cookie` program on a real SO_REUSEPORT UDP group (no daemon).

The test plays the master: generation 1's sockets, then generation 2's, in
one group; generation 1 is parked (draining) and then closed. A datagram that
starts with a live socket's cookie lands on that socket; any other lands on
generation 2's (the ACTIVE) sockets; after a close the moved socket keeps its
cookie.
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
from upgraderd.system import flowcookie
from upgraderd.system.sockets import ListenerSet


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.1", 0))
        return int(u.getsockname()[1])


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


def test_cookies_stick_to_their_generation_until_it_closes(rig):
    ls, cfg = rig
    port = cfg.listeners[0].port
    spec = cfg.listeners[0]
    readers = socks(ls, cfg, 1)
    assert key_for(spec, 1, 1) == ("127.0.0.1", port, "udp/cookie@1", 1)
    assert ls.steer(cfg, [0, 1], 1) is None
    readers |= socks(ls, cfg, 2)                          # generation 2 starts: 4 sockets
    new, c10, c11, c21, short = b"\0\0\0\0", flowcookie.cookie(1, 0), flowcookie.cookie(1, 1), \
        flowcookie.cookie(2, 1), b"\1"
    assert where(port, readers, [new, c10]) == [{(1, 0), (1, 1)}, {(1, 0)}]
    assert ls.steer(cfg, [0, 1], 2) is None               # generation 2 is ACTIVE
    done = ls.retire(keys_for(cfg, [0, 1], 2), held=keys_for(cfg, [0, 1], 1))
    assert sorted(done.parked) == sorted(keys_for(cfg, [0, 1], 1)) and done.closed == []
    assert where(port, readers, [new, c10, c11, c21]) == [{(2, 0), (2, 1)}, {(1, 0)}, {(1, 1)}, {(2, 1)}]
    # Generation 1's workers exit (their fds close), then the master closes its sockets:
    # generation 2's move into their indices.
    for gen_slot in [(1, 0), (1, 1)]:
        readers.pop(gen_slot).close()
    done = ls.retire(keys_for(cfg, [0, 1], 2), held=set())
    assert sorted(done.closed) == sorted(keys_for(cfg, [0, 1], 1))
    got = where(port, readers, [new, c10, c21, short])
    assert got[0] == got[1] == got[3] == {(2, 0), (2, 1)}
    assert got[2] == {(2, 1)}


def test_program_layout():
    prog = flowcookie.program({flowcookie.cookie_value(3, 1): 2}, [0, 1])
    assert prog[0] == (flowcookie.BPF_LD_W_LEN, 0, 0, 0)
    assert prog[1] == (flowcookie.BPF_JGE_K, 1, 0, 4)
    assert prog[2] == (flowcookie.BPF_JA, 0, 0, 3)          # over ld and the 2-instruction table
    assert prog[4][3] == (3 << 16) | 1 and prog[5][3] == 2
