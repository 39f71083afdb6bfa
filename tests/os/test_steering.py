"""Steering new connections of a real SO_REUSEPORT group on 127.0.0.1 (no daemon).

Each test binds a ListenerSet's slot sockets, steers, opens real connections
and counts, by non-blocking accept on each slot's socket, where they queued.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Iterable, Iterator

import pytest

from upgraderd.core.seams import key_for, keys_for
from upgraderd.config import schema
from upgraderd.config.schema import Config
from upgraderd.system import sockets, steering
from upgraderd.system.sockets import ListenerSet

CONNECTIONS = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def config(port: int, count: int, mode: str = "reuseport") -> Config:
    return schema.parse(f"listeners:\n  - {{name: web, host: 127.0.0.1, port: {port}, mode: {mode}}}\n"
                        f"workers: {{count: {count}, app: echo}}\n")


class Slots:
    """Accept-side handles on a ListenerSet's slot sockets (dups, as a worker holds them)."""

    def __init__(self, listeners: ListenerSet, cfg: Config, slots: range) -> None:
        self.port = cfg.listeners[0].port
        self.socks: dict[int, socket.socket] = {}
        for slot in slots:
            fd = listeners.child_fds(cfg, slot)[0]
            s = socket.socket(fileno=os.dup(fd))
            s.setblocking(False)
            self.socks[slot] = s

    def close(self, slot: int) -> None:
        self.socks.pop(slot).close()

    def connect(self, n: int = CONNECTIONS) -> dict[int, int]:
        """Open `n` connections; return how many queued on each slot (waits until all are counted)."""
        clients = self.open(n)
        try:
            return self.count(n, self.socks)
        finally:
            for c in clients:
                c.close()

    def open(self, n: int) -> list[socket.socket]:
        """Open `n` connections and return the clients, without accepting them."""
        return [socket.create_connection(("127.0.0.1", self.port), timeout=5) for _ in range(n)]

    def count(self, n: int, slots: Iterable[int]) -> dict[int, int]:
        """Accept on `slots` until `n` connections are counted (or 5 s pass); return them by slot."""
        got = {slot: 0 for slot in slots}
        deadline = time.monotonic() + 5
        while sum(got.values()) < n and time.monotonic() < deadline:
            for slot in got:
                got[slot] += _accept_all(self.socks[slot])
        return got

    def close_all(self) -> None:
        for s in self.socks.values():
            s.close()


def _accept_all(s: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = s.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


@pytest.fixture
def group() -> Iterator[tuple[ListenerSet, Config]]:
    ls = ListenerSet()
    cfg = config(free_port(), 3)
    ls.ensure(cfg)
    yield ls, cfg
    ls.close_all()


def landed(counts: dict[int, int]) -> set[int]:
    return {slot for slot, n in counts.items() if n}


def test_without_steering_the_kernel_spreads_over_every_socket(group):
    ls, cfg = group
    slots = Slots(ls, cfg, range(3))
    counts = slots.connect()
    slots.close_all()
    assert sum(counts.values()) == CONNECTIONS
    assert landed(counts) == {0, 1, 2}


@pytest.mark.parametrize("ready", [{0, 1}, {1, 2}, {0, 2}, {1}])
def test_new_connections_land_only_on_the_ready_slots(group, ready):
    ls, cfg = group
    assert not ls.is_steered(cfg)
    assert ls.steer(cfg, ready) is None
    assert ls.is_steered(cfg)
    slots = Slots(ls, cfg, range(3))
    counts = slots.connect()
    slots.close_all()
    assert sum(counts.values()) == CONNECTIONS
    assert landed(counts) == ready
    assert ls.steer_refused == 0


def test_a_closed_middle_socket_moves_the_last_one_and_steering_follows(group):
    ls, cfg = group
    ls.ensure(cfg, count=4)                       # slots 0..3: group indices 0..3
    assert ls.steer(cfg, {0, 1, 3}) is None
    slots = Slots(ls, cfg, range(4))
    slots.close(1)                                # the worker's copy goes first
    closed = ls.retire(keys_for(cfg, [0, 2, 3]))
    assert closed.closed == [("127.0.0.1", cfg.listeners[0].port, "reuseport", 1)]
    assert closed.unsafe == closed.closed         # it was steered to until now
    # Slot 3 now sits at index 1 of the kernel's array; slot 2 is still not ready.
    counts = slots.connect()
    assert sum(counts.values()) == CONNECTIONS
    assert landed(counts) == {0, 3}
    assert ls.steer(cfg, {0, 2, 3}) is None
    counts = slots.connect()
    slots.close_all()
    assert landed(counts) == {0, 2, 3}


def test_closing_slot_0_while_only_the_last_is_allowed_keeps_it_steered(group):
    ls, cfg = group
    assert ls.steer(cfg, {0, 2}) is None
    slots = Slots(ls, cfg, range(3))
    slots.close(0)
    ls.retire(keys_for(cfg, [1, 2]))      # slot 2 moves into index 0
    counts = slots.connect()
    slots.close_all()
    assert counts == {1: 0, 2: CONNECTIONS}


def test_a_failing_grow_gets_no_connection_and_closes_safely(group):
    ls, cfg = group
    assert ls.steer(cfg, {0, 1, 2}) is None
    opened = ls.ensure(cfg, count=5)              # the new generation's slots 3 and 4
    assert [k[3] for k in opened] == [3, 4]
    slots = Slots(ls, cfg, range(5))
    counts = slots.connect()
    slots.close(3)
    slots.close(4)
    done = ls.retire(keys_for(cfg, range(3)))
    assert (counts[3], counts[4]) == (0, 0)
    assert landed(counts) == {0, 1, 2}
    assert sorted(k[3] for k in done.closed) == [3, 4] and done.unsafe == []
    counts = slots.connect()
    slots.close_all()
    assert landed(counts) == {0, 1, 2}


def test_steering_to_nothing_keeps_the_last_program(group, caplog):
    ls, cfg = group
    assert ls.steer(cfg, {1}) is None
    note = ls.steer(cfg, set())
    assert note is not None and "no ready slot" in note and f":{cfg.listeners[0].port}" in note
    assert ls.steer(cfg, set()) is None           # said once, not on every pass
    slots = Slots(ls, cfg, range(3))
    counts = slots.connect()
    slots.close_all()
    assert counts == {0: 0, 1: CONNECTIONS, 2: 0}


def test_steering_to_nothing_first_attaches_nothing(group):
    ls, cfg = group
    assert ls.steer(cfg, []) is not None
    slots = Slots(ls, cfg, range(3))
    counts = slots.connect()
    slots.close_all()
    assert landed(counts) == {0, 1, 2}


def test_a_held_socket_is_parked_until_its_worker_is_gone(group):
    ls, cfg = group
    key2 = key_for(cfg.listeners[0], 2)
    assert ls.steer(cfg, {2}) is None
    slots = Slots(ls, cfg, range(3))
    queued = slots.open(10)                       # they wait on slot 2 for its worker
    assert ls.steer(cfg, {0, 1, 2}) is None
    parked = ls.retire(keys_for(cfg, [0, 1]), held={key2})
    assert parked.parked == [key2] and parked.closed == []
    assert key2 in ls.keys()
    queued += slots.open(CONNECTIONS)
    assert sum(slots.count(CONNECTIONS, [0, 1]).values()) == CONNECTIONS
    # The retiring worker drains its copy: the 10 are all still there.
    assert slots.count(10, [2]) == {2: 10}
    released = ls.retire(keys_for(cfg, [0, 1]))
    assert released.closed == [key2] and released.unsafe == []
    with pytest.raises(OSError) as e:             # shut down: it left the group now
        slots.socks[2].accept()
    assert e.value.errno == errno.EINVAL
    slots.close(2)
    counts = slots.connect()
    slots.close_all()
    for c in queued:
        c.close()
    assert landed(counts) == {0, 1} and sum(counts.values()) == CONNECTIONS


def test_a_reexec_carries_the_group_order(group):
    ls, cfg = group
    ls.ensure(cfg, count=4)
    assert ls.steer(cfg, {0, 1, 2, 3}) is None
    ls.retire(keys_for(cfg, [1, 2, 3]))   # slot 3 moves into index 0
    exported = ls.export()
    heir = ListenerSet()
    heir.adopt([{**e, "fd": os.dup(e["fd"])} for e in exported])
    ls.close_all()                                # the old master's fds; the heir's dups keep the group
    try:
        assert heir.steer(cfg, {2}) is None
        slots = Slots(heir, cfg, range(1, 4))
        counts = slots.connect()
        slots.close_all()
        assert counts == {1: 0, 2: CONNECTIONS, 3: 0}
    finally:
        heir.close_all()


def test_sockets_adopted_without_their_order_are_not_steered(group):
    ls, cfg = group
    exported = [{k: v for k, v in e.items() if k != "pos"} for e in ls.export()]
    heir = ListenerSet()
    heir.adopt([{**e, "fd": os.dup(e["fd"])} for e in exported])
    ls.close_all()
    try:
        note = heir.steer(cfg, {0})
        assert note is not None and "not known" in note
        slots = Slots(heir, cfg, range(3))
        counts = slots.connect()
        slots.close_all()
        assert landed(counts) == {0, 1, 2}
    finally:
        heir.close_all()


def test_a_refused_program_falls_back_to_the_kernel_hash(group, monkeypatch, caplog):
    ls, cfg = group

    def refuse(sock: socket.socket, prog: steering.Program) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(steering, "attach", refuse)
    note = ls.steer(cfg, {0})
    assert note is not None and "refused the steering program" in note and "EPERM" not in note
    assert ls.steer_refused == 1
    assert ls.steer(cfg, {1}) is None and ls.steer_refused == 1   # not retried on every pass
    assert not ls.is_steered(cfg)
    assert "refused the steering program" in caplog.text
    slots = Slots(ls, cfg, range(3))
    counts = slots.connect()
    slots.close_all()
    assert landed(counts) == {0, 1, 2}


def test_the_kernel_refuses_a_malformed_program():
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        bad = ((steering.BPF_JEQ_K, 5, 0, 0),)    # jumps past the end, never returns
        with pytest.raises(OSError) as e:
            steering.attach(s, bad)
        assert e.value.errno == errno.EINVAL


def test_a_group_shared_with_the_other_mode_steers_only_the_ready_mode(group):
    ls, cfg = group
    port = cfg.listeners[0].port
    shared = config(port, 1, mode="shared")
    ls.ensure(shared)                             # e.g. a reload that changes the mode
    assert ls.steer(cfg, {0, 1, 2}) is None
    old = Slots(ls, shared, range(1))
    slots = Slots(ls, cfg, range(3))
    counts = slots.connect()
    assert old.connect(0) == {0: 0} and _accept_all(old.socks[0]) == 0
    old.close_all()
    slots.close_all()
    assert landed(counts) == {0, 1, 2}


def test_the_kernel_hashes_over_every_socket_when_the_index_is_out_of_range(group):
    # Why the builder never returns an index past the group, and why a close
    # is bracketed by leave_plan(): the kernel does not drop, it spreads.
    ls, cfg = group
    via = socket.socket(fileno=os.dup(ls.child_fds(cfg, 0)[0]))
    try:
        steering.attach(via, ((steering.BPF_RET_K, 0, 0, 3),))
        slots = Slots(ls, cfg, range(3))
        counts = slots.connect()
        slots.close_all()
        assert landed(counts) == {0, 1, 2}
        steering.attach(via, ((steering.BPF_RET_K, 0, 0, 2),))
        slots = Slots(ls, cfg, range(3))
        counts = slots.connect()
        slots.close_all()
        assert counts == {0: 0, 1: 0, 2: CONNECTIONS}
    finally:
        via.close()


def test_the_kernel_takes_the_largest_table_the_builder_makes():
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        prog = steering.program(range(0, 2 * steering.MAX_ALLOWED + 10, 2))
        assert len(prog) == 4 + 2 * (steering.MAX_ALLOWED - 1) + 1
        steering.attach(s, prog)


def test_the_same_ready_slots_after_a_park_still_leave_the_parked_socket_out(group):
    # steer() keeps what it worked out from its arguments and the set's sockets; the same
    # ready slots once a socket is parked (or a socket joined) must not reuse the old answer.
    ls, cfg = group
    key2 = key_for(cfg.listeners[0], 2)
    assert ls.steer(cfg, (0, 1, 2)) is None
    slots = Slots(ls, cfg, range(3))
    assert ls.retire(keys_for(cfg, [0, 1]), held={key2}).parked == [key2]
    assert ls.steer(cfg, (0, 1, 2)) is None        # slot 2 still READY in this call: parked wins
    assert landed(slots.connect()) == {0, 1}
    assert ls.steer(cfg, (0, 1, 2, 3)) is None     # slot 3 has no socket yet
    assert landed(slots.connect()) == {0, 1}
    ls.ensure(cfg, slots=[3])                      # now it has: the same call must take it in
    slots.close_all()
    slots = Slots(ls, cfg, range(4))
    assert ls.steer(cfg, (0, 1, 2, 3)) is None
    assert landed(slots.connect()) == {0, 1, 3}
    slots.close_all()
