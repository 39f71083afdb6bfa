"""Hand-off for the built-in workers: take connections while serving, give them at drain.

With `drain.handoff: auto` (UPGRADERD_HANDOFF=auto, contract/env.py) a built-in worker opens
its hand-off channel before READY=1 (or exits, failing its generation, if it
cannot) and adopts whatever connection an older
worker (or a retiring sibling) commits to it. When it drains, it offers every
connection it can move to the ACTIVE generation, round-robin over its
workers, instead of waiting for the connection to end. A connection moves:
- only between requests: the protocol says when (`Movable.handoff_state()`
  returns None while a request is half read), and the move is retried on
  every loop pass until then;
- after the loop stopped reading it (it is unregistered first), with the
  output not yet sent and the bytes read but not handled;
- for good only once the taker acknowledged; if the taker refuses, stays
  silent or dies, the connection is registered again and served on.
When no taker is left, the remaining connections are drained as before, and
offered again every RETRY seconds to whatever takers exist then. At the
master's stop (`worker.stopping()`) nothing is offered: no generation will
take over, and siblings still to get their own drain signal would only pass
the connections around; they are drained as without hand-off.
"""

from __future__ import annotations

import select
import socket
import sys
import time
from typing import Callable, Protocol, runtime_checkable

from upgraderd import worker
from upgraderd.apps import logline
from upgraderd.apps.conn import Conn, ConnectionProtocol, full_socket
from upgraderd.apps.connmetrics import ConnectionMetrics
from upgraderd.worker import handoff


@runtime_checkable
class Movable(Protocol):
    """A connection protocol whose connections can move to another worker."""

    def handoff_state(self) -> tuple[bytes, bytes] | None:
        """Return (state blob, bytes read but not handled), or None while it cannot move."""

    def restore(self, state: bytes) -> None:
        """Take over the state blob of a connection that moved here."""


class Host(Protocol):
    """What `Moves` uses of its event loop (apps/server.py's `Server`), and nothing more."""

    listeners: dict[str, socket.socket]
    factory: Callable[[str], ConnectionProtocol]
    ep: select.epoll
    conns: dict[int, Conn]
    draining_since: float | None
    metrics: ConnectionMetrics

    def register_taker(self, taker: handoff.Taker) -> None:
        """Watch the hand-off channel in the loop."""

    def unregister_taker(self, taker: handoff.Taker) -> None:
        """Stop watching the hand-off channel."""

    def track(self, conn: Conn) -> None:
        """Serve `conn` from the loop."""

    def flush(self, conn: Conn) -> None:
        """Send what `conn` has queued."""


RETRY = 2.0  # seconds between two searches for takers while connections are left


class Moves:
    """The hand-off side of one `Server`."""

    def __init__(self, server: Host, take: bool,
                 giver: Callable[[], handoff.Giver] = handoff.Giver,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self.take = take
        self.new_giver, self.clock = giver, clock
        self.taker: handoff.Taker | None = None
        self.giver: handoff.Giver | None = None
        self.found_at = 0.0

    def open(self) -> None:
        """Open this worker's channel (before READY=1); exit if it cannot be opened.

        A worker without its channel would be counted ready while its
        predecessors could give it nothing, and their connections would be cut
        at drain.timeout. Failing before READY=1 fails the new generation
        instead: the reload is reported failed and the old workers keep their
        connections.
        """
        if not self.take:
            return
        try:
            self.taker = handoff.Taker(list(self.server.listeners))
        except OSError as e:
            self.server.metrics.handoff_failed("channel_in_use")
            self.server.metrics.flush()
            raise SystemExit(f"upgraderd worker: hand-off channel unavailable, not starting: {e}") from None
        self.server.register_taker(self.taker)

    def poll(self) -> None:
        """Adopt what the channel committed to us, and settle its timeouts."""
        if self.taker is not None:
            for moved in self.taker.poll():
                self._adopt(moved)
            self._count(self.taker.failures)

    def start_giving(self) -> None:
        """We drain: stop taking, find the takers and move every connection we can."""
        if self.taker is not None:
            self.server.unregister_taker(self.taker)
            for moved in self.taker.close():
                self._adopt(moved)
            self._count(self.taker.failures)
            self.taker = None
        started = self.clock()
        self.giver = self.new_giver()
        stopping = worker.stopping()
        if not stopping:  # at the master's stop nobody takes: drain as without hand-off
            self.giver.find()
        self.found_at = started
        held = len(self.server.conns)
        self.give_ready()
        if held and self.take and stopping:
            logline.log(f"worker generation {self.giver.generation} slot {self.giver.slot}: the master stops: "
                        f"draining {held} connection(s), no hand-off")
        elif held and self.take:  # one line per worker, not per thread
            logline.log(f"worker generation {self.giver.generation} slot {self.giver.slot}: handed "
                        f"{self.giver.given} of {held} connection(s) to {self.giver.targets} worker(s) "
                        f"in {(self.clock() - started) * 1000:.0f} ms")

    @property
    def giving(self) -> bool:
        """Return True while connections should wait to be given rather than drained."""
        return self.giver is not None and self.giver.targets > 0

    def give_ready(self) -> None:
        """Give every connection that can move now; drain the rest once no taker is left.

        A connection that could not be given is served on and drained as without
        hand-off, and offered again after RETRY seconds to the takers found then:
        a taker that was slow under load may answer next time, and an echo
        stream that stays here would be cut at drain.timeout.
        """
        if self.giver is None:
            return
        if not self.giving and self.server.conns and self.clock() - self.found_at >= RETRY \
                and not worker.stopping():
            self.giver.find()
            self.found_at = self.clock()
        movable = [conn for conn in self.server.conns.values() if self._movable(conn)] if self.giving else []
        if movable:
            self._give(movable)
        self._count(self.giver.failures)
        if not self.giving:
            for conn in self.server.conns.values():
                self._stay(conn)

    def close(self) -> None:
        """Release the channel sockets at exit."""
        if self.giver is not None:
            self.giver.close()
        if self.taker is not None:
            self.taker.close()

    def _movable(self, conn: Conn) -> bool:
        proto = conn.proto
        if not isinstance(proto, Movable):
            self._stay(conn)
            return False
        # A half-read request (handoff_state() is None) moves on a later pass.
        return conn.sock.fileno() >= 0 and not conn.eof and not proto.closing() \
            and proto.handoff_state() is not None

    def _give(self, conns: list[Conn]) -> None:
        """Offer `conns` in one batch; serve on those no taker committed to."""
        assert self.giver is not None
        server = self.server
        moving = []
        for conn in conns:
            assert isinstance(conn.proto, Movable)
            state = conn.proto.handoff_state()
            assert state is not None
            conn.shared = True  # the taker may hold it too from now on: unregister it before a close
            if conn.events:
                server.ep.unregister(conn.sock.fileno())  # stop reading before offering
            moving.append(handoff.Handed(full_socket(conn), conn.listener, state[0], state[1], bytes(conn.out)))
        for conn, given in zip(conns, self.giver.give_many(moving)):
            if given:
                self._handed_off(conn)
            elif conn.events:
                server.ep.register(conn.sock.fileno(), conn.events)  # not given: serve it on here

    def _adopt(self, moved: handoff.Handed) -> None:
        """Serve a connection another worker handed to us, from where it left off."""
        server = self.server
        sock = moved.sock
        sock.setblocking(False)
        proto = server.factory(moved.listener)
        if isinstance(proto, Movable):
            proto.restore(moved.state)
        conn = Conn(sock, proto, moved.listener)
        conn.shared = True  # the giver's copy may still be open
        conn.out += moved.unsent
        server.metrics.taken_over(moved.listener)
        server.track(conn)
        if server.draining_since is not None and not self.giving:
            proto.drain()
        if moved.unhandled:
            conn.out += proto.received(moved.unhandled)
        server.flush(conn)

    def _handed_off(self, conn: Conn) -> None:
        """Forget a connection that another worker now serves (it is already unregistered)."""
        self.server.conns.pop(conn.sock.fileno(), None)
        conn.sock.close()
        conn.events = 0
        self.server.metrics.handed_off(conn.listener)

    def _stay(self, conn: Conn) -> None:
        """Serve `conn` on here and drain it as a worker without hand-off would."""
        if not conn.stay:
            conn.stay = True
            conn.proto.drain()

    def _count(self, failures: dict[str, int]) -> None:
        for reason, n in failures.items():
            self.server.metrics.handoff_failed(reason, n)
        failures.clear()
