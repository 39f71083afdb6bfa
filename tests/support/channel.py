"""The hand-off channel seen from a test: a Taker on a fake clock, and a raw giver's socket.

For the tests that drive `upgraderd.worker.handoff` in one process with real Unix and
TCP sockets and no daemon (tests/os/test_handoff_*.py). Each test module passes its own
master pid, one no real process has here, so its channel names stay private to it.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from tests.support.fakes import FakeClock
from upgraderd.contract import wire
from upgraderd.worker import handoff


def taker_of(master: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[handoff.Taker, FakeClock]]:
    """Yield a Taker of generation 2 slot 0 for listener "web" that trusts every peer, on a fake
    clock; it is closed after. For a fixture: `yield from taker_of(MASTER, monkeypatch)`."""
    monkeypatch.setenv("UPGRADERD_GENERATION", "2")
    monkeypatch.setenv("UPGRADERD_SLOT", "0")
    clock = FakeClock(100.0)
    t = handoff.Taker(["web"], master=master, trust=lambda p: True, clock=clock)
    try:
        yield t, clock
    finally:
        t.close()


def connect(t: handoff.Taker) -> socket.socket:
    """Return a giver's end of a channel connection to `t` (5 s timeout)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(wire.address(t.name))
    return s


def send_fd(s: socket.socket, msg: bytes, fd: int) -> None:
    """Send `msg` with `fd` attached, as a giver's OFFER goes."""
    s.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
