"""system/rescuer.py against real sockets: this test process plays the master, a child process the READY taker."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from tests.support import ROOT
from tests.support.upgraderd_proc import wait_until
from upgraderd.core.seams import Rescue
from upgraderd.system.rescuer import Rescuer, _Held
from upgraderd.worker import peers
from upgraderd.worker.peers import Peer

KEY = ("127.0.0.1", 0, "reuseport", 2)

# A worker of generation 3, slot 1: it takes what its parent gives and answers in upper case.
TAKER = textwrap.dedent("""
    import select, sys
    from upgraderd.worker import handoff
    taker = handoff.Taker(["web"])
    print("ready", flush=True)
    while True:
        select.select([taker.fileno(), sys.stdin], [], [], 0.1)
        for moved in taker.poll():
            with moved.sock as conn:
                conn.settimeout(5)
                conn.sendall(conn.recv(100).upper())
        if select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.read(1):
            break
""")


@pytest.fixture
def taker() -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "UPGRADERD_GENERATION": "3", "UPGRADERD_SLOT": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", TAKER], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def queued() -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A listening socket nobody accepts on, with three connections queued that sent b'hello N'."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        clients = [socket.create_connection(lsock.getsockname(), timeout=10) for _ in range(3)]
        for i, c in enumerate(clients):
            c.sendall(b"hello %d" % i)
        yield lsock, clients
        for c in clients:
            c.close()


def test_queued_connections_are_accepted_and_handed_to_the_ready_taker(taker, queued):
    lsock, clients = queued
    rescuer = Rescuer(lambda key: lsock.fileno() if key == KEY else None)
    try:
        assert rescuer.rescue(Rescue(3, ((KEY, "web"),), (1,))) == [3]
        # Served by the taker, on the same connections the clients opened.
        assert [c.recv(100) for c in clients] == [b"HELLO %d" % i for i in range(3)]
        # The thread counts after the taker's COMMIT, which may be after the answers arrived.
        wait_until(lambda: rescuer.given == 3, 10, "the rescuer to count 3 hand-offs")
        assert rescuer.holding() == 0
        # The listener's file description is shared with workers: still blocking, as before.
        assert not fcntl.fcntl(lsock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        rescuer.close()


def test_nothing_is_accepted_when_no_taker_of_the_plan_listens(taker, queued):
    lsock, clients = queued
    rescuer = Rescuer(lambda key: lsock.fileno())
    try:
        # The taker is slot 1 of generation 3: slot 2, or generation 4, finds nobody.
        assert rescuer.rescue(Rescue(3, ((KEY, "web"),), (2,))) == [0]
        assert rescuer.rescue(Rescue(4, ((KEY, "web"),), (1,))) == [0]
    finally:
        rescuer.close()
    # They are still queued, for whoever accepts next.
    lsock.settimeout(5)
    for _ in clients:
        conn, _ = lsock.accept()
        conn.close()


def test_held_connections_go_to_the_oldest_generation_with_a_channel_once_theirs_is_gone(taker, queued):
    lsock, clients = queued
    conn, _ = lsock.accept()
    rescuer = Rescuer(lambda key: None)
    try:
        # Accepted for generation 2, which has drained since (no channel): generation 3 takes it.
        assert rescuer._give([_Held(conn, "web")], Rescue(2, ((KEY, "web"),), (1,))) == []
        assert clients[0].recv(100) == b"HELLO 0"
        assert rescuer.given == 1
    finally:
        rescuer.close()


def test_an_empty_queue_costs_no_channel_lookup(queued, monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as empty:
        monkeypatch.setattr(peers, "listening_channels", lambda master: pytest.fail("looked up channels"))
        rescuer = Rescuer(lambda key: empty.fileno())
        assert rescuer.rescue(Rescue(3, ((KEY, "web"),), (1,))) == [0]
        rescuer.close()


def test_the_taker_trusts_its_parent_and_the_master_trusts_its_children():
    me, parent = os.getpid(), os.getppid()
    assert peers.is_master(Peer(parent, 0, None, None), parent)
    assert not peers.is_master(Peer(parent, 0, None, None), parent + 1)   # a master that is not our parent
    assert not peers.is_master(Peer(me, 0, None, None), me)
    assert peers.child_of(Peer(4242, 65534, me, 3), me, 3)                # any uid: workers.user
    assert not peers.child_of(Peer(4242, 0, me, 2), me, 3)                # another generation
    assert not peers.child_of(Peer(4242, 0, me + 1, 3), me, 3)            # someone else's child
    assert not peers.child_of(Peer(me, 0, me, 3), me, 3)
