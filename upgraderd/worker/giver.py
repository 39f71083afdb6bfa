"""The giving end of hand-offs: find the takers, offer one connection at a time.

A draining worker gives to the oldest generation newer than its own that
still has its channels open: the ACTIVE one. When
there is none (its slot was retired by TTOU, or the master is stopping) it
gives to its siblings of the same generation; siblings that are draining
themselves have closed their channel or refuse. A taker that fails once (it
refused, fell silent past `timeout`, vanished, or is not who its name says)
is dropped for the rest of this drain, and the connection is offered to the
next one; when none is left, `give()` returns False and the caller serves the
connection on. A connection is never lost here: its fd stays open in this
process until the taker has answered ACK and our COMMIT went out.
"""

from __future__ import annotations

import array
import os
import socket
import time
from collections import Counter
from typing import Callable

from upgraderd.worker import peers, wire
from upgraderd.worker.moved import Handed, identity
from upgraderd.worker.peers import Channel, Peer


class _Target:
    """One taker's channel and, once connected and checked, our socket to it."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.sock: socket.socket | None = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Giver:
    """Offers this worker's connections to other workers of the same master (blocking)."""

    def __init__(self, *, master: int | None = None, timeout: float = 1.0,
                 trust: Callable[[Peer, Channel], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.generation, self.slot = identity()
        self.master = os.getppid() if master is None else master
        self.timeout, self.clock = timeout, clock
        self.trust = trust or (lambda p, c: peers.trusted(p, self.master, c.generation, c.generation))
        self.failures: Counter[str] = Counter()
        self.given = 0
        self._targets: list[_Target] = []
        self._next = 0

    def find(self) -> int:
        """Look up the takers to give to now; return how many there are."""
        self.close()
        channels = peers.listening_channels(self.master)
        newer = [c for c in channels if c.generation > self.generation]
        if newer:
            # The oldest newer generation whose channels are open: a generation closes
            # them when it drains, and ours drains only once its successor is ACTIVE, so
            # this is the ACTIVE one, never a STARTING one that may yet fail (see docs).
            successor = min(c.generation for c in newer)
            chosen = [c for c in newer if c.generation == successor]
        else:
            chosen = [c for c in channels if c.generation == self.generation and c.slot != self.slot]
        self._targets = [_Target(c) for c in chosen]
        # Start at our own slot: the givers of one generation then spread evenly.
        self._next = self.slot % len(self._targets) if self._targets else 0
        return len(self._targets)

    @property
    def targets(self) -> int:
        """Return how many takers are still in play."""
        return len(self._targets)

    def give(self, moving: Handed) -> bool:
        """Offer `moving` until a taker commits to it; return True if it is theirs now.

        Stop reading the connection before calling this. On True, close your
        copy and never touch the connection again; on False, serve it on.
        """
        try:
            msgs = wire.encode_offer(moving.listener, moving.state, moving.unhandled, moving.unsent)
        except ValueError:
            self.failures["too_large"] += 1
            return False
        while self._targets:
            target = self._targets[self._next % len(self._targets)]
            outcome = self._offer(target, moving.sock.fileno(), msgs)
            if outcome == "":
                self._next += 1
                self.given += 1
                return True
            self.failures[outcome] += 1
            target.close()
            self._targets.remove(target)
        return False

    def close(self) -> None:
        """Close every channel socket (a taker that had not seen COMMIT drops its copy)."""
        for t in self._targets:
            t.close()

    def _offer(self, target: _Target, fd: int, msgs: list[bytes]) -> str:
        """Run one exchange; return "" on success, else the failure reason."""
        deadline = self.clock() + self.timeout
        try:
            sock = target.sock or self._connect(target, deadline)
            if sock is None:
                return "untrusted_taker"
            _timeout(sock, deadline, self.clock)
            sock.sendmsg([msgs[0]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            for msg in msgs[1:]:
                _timeout(sock, deadline, self.clock)
                sock.send(msg)
            _timeout(sock, deadline, self.clock)
            reply = sock.recv(wire.RECV_SIZE)
            if not reply:
                return "taker_gone"
            kind = wire.kind_of(reply)
            if kind == wire.REFUSE:
                return "refused"
            if kind != wire.ACK:
                return "malformed_reply"
            sock.send(wire.encode(wire.COMMIT))
            return ""
        except (socket.timeout, TimeoutError):
            return "timeout"
        except wire.Malformed:
            return "malformed_reply"
        except OSError:
            return "taker_gone"

    def _connect(self, target: _Target, deadline: float) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        target.sock = sock
        _timeout(sock, deadline, self.clock)
        sock.connect(peers.address(target.channel.name))
        if not self.trust(peers.peer_of(sock), target.channel):
            return None
        return sock


def _timeout(sock: socket.socket, deadline: float, clock: Callable[[], float]) -> None:
    """Give the next blocking call on `sock` what is left until `deadline`."""
    left = deadline - clock()
    if left <= 0:
        raise TimeoutError("hand-off deadline passed")
    sock.settimeout(left)
