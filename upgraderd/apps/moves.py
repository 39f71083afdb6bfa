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
- for good only once the taker acknowledged and our COMMIT went out; if the
  taker refuses, stays silent or dies, the connection is registered again
  and served on;
- without blocking the loop (upgraderd/worker/outbox.py): each taker has at
  most a batch in flight, and every connection not in flight is served
  meanwhile. A blocking give of thousands of connections served none of them
  for seconds, its takers timed out, and what was left waited for drain.timeout.
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
from collections import Counter
from typing import Callable, Protocol, cast, runtime_checkable

from upgraderd import worker
from upgraderd.apps import logline
from upgraderd.apps.conn import Conn, ConnectionProtocol, full_socket
from upgraderd.apps.connmetrics import ConnectionMetrics
from upgraderd.worker import handoff
from upgraderd.worker.outbox import Outbox


@runtime_checkable
class Movable(Protocol):
    """A connection protocol whose connections can move to another worker."""

    def handoff_state(self) -> tuple[bytes, bytes] | None:
        """Return (state blob, bytes read but not handled), or None while it cannot move."""

    def restore(self, state: bytes) -> None:
        """Take over the state blob of a connection that moved here."""


_MOVABLE: dict[type, bool] = {}


def movable(proto: object) -> bool:
    """Return True if `proto`'s class implements `Movable`, asked once per class.

    `isinstance()` against a runtime-checkable Protocol walks the protocol's
    attributes on every call in Python 3.11: per connection, on each pass of a
    drain and at each adoption, it was the largest cost of moving 50,000
    connections (bench/connections.py under a profiler, old and new workers).
    """
    kind = type(proto)
    known = _MOVABLE.get(kind)
    if known is None:
        known = _MOVABLE[kind] = isinstance(proto, Movable)
    return known


class Host(Protocol):
    """What `Moves` uses of its event loop (apps/server.py's `Server`), and nothing more."""

    listeners: dict[str, socket.socket]
    factory: Callable[[str], ConnectionProtocol]
    ep: select.epoll
    conns: dict[int, Conn]
    draining_since: float | None
    metrics: ConnectionMetrics

    def watch_handoff(self, fd: int, taker: bool) -> None:
        """Watch the hand-off channel's fd (`taker`: `poll()` on readiness) or the outbox's (a wake-up:
        each pass while draining calls `give_ready()`)."""

    def unwatch_handoff(self, fd: int) -> None:
        """Stop watching a hand-off fd."""

    def track(self, conn: Conn) -> None:
        """Serve `conn` from the loop."""

    def flush(self, conn: Conn) -> None:
        """Send what `conn` has queued."""


RETRY = 2.0  # seconds between two searches for takers while connections are left


class Outgoing(Protocol):
    """What `Moves` uses of an `Outbox` (upgraderd/worker/outbox.py)."""

    failures: Counter[str]
    given: int

    def fileno(self) -> int:
        """Return an fd readable when a taker has answered."""

    @property
    def targets(self) -> int:
        """Return how many takers are still in play."""

    def has_room(self) -> bool:
        """Return True if a taker can take another offer now."""

    def offer(self, key: int, moving: handoff.Handed) -> bool:
        """Queue one connection; False: serve it on."""

    def pump(self) -> tuple[list[int], list[int]]:
        """Return the keys given and the keys back."""

    def close(self) -> list[int]:
        """Drop every taker; return the keys in flight."""


class Moves:
    """The hand-off side of one `Server`."""

    def __init__(self, server: Host, take: bool,
                 giver: Callable[[], handoff.Giver] = handoff.Giver,
                 clock: Callable[[], float] = time.monotonic,
                 outbox: Callable[[handoff.Giver], Outgoing] = Outbox) -> None:
        self.server = server
        self.take = take
        self.new_giver, self.new_outbox, self.clock = giver, outbox, clock
        self.taker: handoff.Taker | None = None
        self.giver: handoff.Giver | None = None
        self.outbox: Outgoing | None = None
        self.moving: dict[int, Conn] = {}   # fd -> connection offered, not settled (out of `server.conns`)
        self.found_at = 0.0
        self._report: tuple[float, int, int] | None = None   # (started, held, takers) until it is logged

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
        self.server.watch_handoff(self.taker.fileno(), taker=True)

    def poll(self) -> None:
        """Adopt what the channel committed to us, and settle its timeouts."""
        if self.taker is not None:
            for moved in self.taker.poll():
                self._adopt(moved)
            self._count(self.taker.failures)

    def start_giving(self) -> None:
        """We drain: stop taking, find the takers and start moving every connection we can.

        With no connection held there is nothing to give, and no taker is
        looked for: that spares each draining worker its connects and peer
        checks, and each taker as many accepts, at every reload.
        """
        if self.taker is not None:
            self.server.unwatch_handoff(self.taker.fileno())
            for moved in self.taker.close():
                self._adopt(moved)
            self._count(self.taker.failures)
            self.taker = None
        started = self.clock()
        self.giver = self.new_giver()
        self.found_at = started
        held = len(self.server.conns)
        if held and worker.stopping():  # nobody takes at the master's stop: drain as without hand-off
            if self.take:  # one line per worker, not per thread
                logline.log(f"worker generation {self.giver.generation} slot {self.giver.slot}: the master "
                            f"stops: draining {held} connection(s), no hand-off")
        elif held:
            self._find()
            self._report = (started, held, self.outbox.targets if self.outbox is not None else 0)
        self.give_ready()

    @property
    def giving(self) -> bool:
        """Return True while connections should wait to be given rather than drained."""
        return self.outbox is not None and self.outbox.targets > 0

    def give_ready(self) -> None:
        """Settle the answers, then offer what can move now while the takers have room.

        Never blocks: the connections not in flight are served on meanwhile. A
        connection that could not be given is served on and drained as without
        hand-off once no taker is left, and offered again after RETRY seconds
        to the takers found then: a taker that was slow under load may answer
        next time, and an echo stream that stays here would be cut at drain.timeout.
        """
        if self.giver is None:
            return
        if not self.giving and not self.moving and self.server.conns and self.clock() - self.found_at >= RETRY \
                and not worker.stopping():
            self._find()
        self._settle()
        if self.giving:
            assert self.outbox is not None
            for conn in list(self.server.conns.values()):
                if not self.outbox.has_room():
                    break
                state = self._movable(conn)
                if state is not None:
                    self._offer(conn, state)
            self._settle()
        if not self.giving:
            for conn in self.server.conns.values():
                self._stay(conn)
        self._log_done()

    def close(self) -> None:
        """Release the channel sockets at exit."""
        self._log_done(final=True)
        if self.outbox is not None:
            self.server.unwatch_handoff(self.outbox.fileno())
            for key in self.outbox.close():
                self.moving.pop(key).sock.close()
            self.outbox = None
        if self.giver is not None:
            self.giver.close()
        if self.taker is not None:
            self.taker.close()

    def _find(self) -> None:
        """Connect to the takers to give to now (a fresh outbox; the old one has nothing in flight)."""
        assert self.giver is not None
        if self.outbox is not None:
            self.server.unwatch_handoff(self.outbox.fileno())
            self.outbox.close()
        self.giver.find()
        self._count(self.giver.failures)
        self.outbox = self.new_outbox(self.giver)
        self.server.watch_handoff(self.outbox.fileno(), taker=False)
        self.found_at = self.clock()

    def _settle(self) -> None:
        """Forget what the takers committed to; serve on what came back."""
        if self.outbox is None:
            return
        done, back = self.outbox.pump()
        for key in done:
            self._handed_off(self.moving.pop(key))
        for key in back:
            conn = self.moving.pop(key)
            self.server.conns[key] = conn
            if conn.events:
                self.server.ep.register(key, conn.events)  # not given: serve it on here
        self._count(self.outbox.failures)

    def _log_done(self, final: bool = False) -> None:
        """Log, once per drain, what was handed, when nothing is in flight and nothing more can go."""
        if self._report is None or self.moving or not (final or not self.server.conns or not self.giving):
            return
        started, held, takers = self._report
        self._report = None
        given = self.outbox.given if self.outbox is not None else 0
        if self.take:  # one line per worker, not per thread
            assert self.giver is not None
            logline.log(f"worker generation {self.giver.generation} slot {self.giver.slot}: handed "
                        f"{given} of {held} connection(s) to {takers} worker(s) "
                        f"in {(self.clock() - started) * 1000:.0f} ms")

    def _movable(self, conn: Conn) -> tuple[bytes, bytes] | None:
        """Return `conn`'s hand-off state if it can move now, else None."""
        proto = conn.proto
        if not movable(proto):
            self._stay(conn)
            return None
        # A half-read request (handoff_state() is None) moves on a later pass.
        if conn.sock.fileno() < 0 or conn.eof or proto.closing():
            return None
        return cast(Movable, proto).handoff_state()

    def _offer(self, conn: Conn, state: tuple[bytes, bytes]) -> None:
        """Stop reading `conn` and offer it with its hand-off `state`; serve it on if no taker can take it."""
        assert self.outbox is not None
        conn.shared = True  # the taker may hold it too from now on: unregister it before a close
        key = conn.sock.fileno()
        if conn.events:
            self.server.ep.unregister(key)  # stop reading before offering
        moving = handoff.Handed(full_socket(conn), conn.listener, state[0], state[1], bytes(conn.out))
        if self.outbox.offer(key, moving):
            self.moving[key] = self.server.conns.pop(key)
        elif conn.events:
            self.server.ep.register(key, conn.events)

    def _adopt(self, moved: handoff.Handed) -> None:
        """Serve a connection another worker handed to us, from where it left off."""
        server = self.server
        sock = moved.sock
        sock.setblocking(False)
        proto = server.factory(moved.listener)
        if movable(proto):
            cast(Movable, proto).restore(moved.state)
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
        """Forget a connection that another worker now serves (unregistered, out of `server.conns`)."""
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
