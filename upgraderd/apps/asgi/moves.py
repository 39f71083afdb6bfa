"""Hand-off for the web worker: keep-alive connections move to the new generation between requests.

The channel is upgraderd's own (upgraderd/worker/handoff.py): the taker is
opened before READY=1 and watched by the event loop; at drain a giver finds
the ACTIVE generation's takers. What moves with a connection is its socket
and the bytes read but not parsed (`HttpProtocol.pending`); the state blob is
empty, because between two requests an HTTP/1.1 connection has no state but
those bytes. Nothing is ever written on a connection that moves: no
`Connection: close`, and the client keeps its TCP connection and local port.

Invariants:
- A connection moves only when `HttpProtocol.idle()`: no request in progress,
  no response bytes queued. Reading is paused before the offer, so every byte
  the client sends after that is still in the kernel's buffer and moves with
  the socket.
- Our fd closes only after the taker committed; a refused or failed offer
  leaves the connection served here, to finish with `Connection: close`.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING

from upgraderd.apps import logline
from upgraderd.apps.asgi import wsmove
from upgraderd.worker import handoff

if TYPE_CHECKING:
    from upgraderd.apps.asgi.roles import Movable, WebHost

RETRY = 2.0   # seconds between two searches for takers while connections are left and none was found


class WebMoves:
    """The taking and giving ends of one web worker."""

    def __init__(self, server: WebHost) -> None:
        self.server = server
        self.enabled = handoff.enabled()
        self.taker: handoff.Taker | None = None
        self.giver: handoff.Giver | None = None
        self.found_at = 0.0

    def open(self) -> bool:
        """Open our channel (before READY=1), so the older generation can give to us; return False
        if it cannot be opened: the worker then must not start (apps/moves.py `open` says why)."""
        if not self.enabled:
            return True
        try:
            self.taker = handoff.Taker(list(self.server.listeners))
        except OSError as e:
            logline.log(f"upgraderd worker: hand-off channel unavailable, not starting: {e}", "ERROR")
            self.server.metrics.handoff_failed("channel_in_use")
            self.server.metrics.flush()
            return False
        self.server.loop.add_reader(self.taker.fileno(), self.poll)
        return True

    def poll(self) -> None:
        """Serve what the channel committed to us."""
        if self.taker is not None:
            self._adopt(self.taker.poll())
            self._count(self.taker.failures)

    def _adopt(self, moved: list[handoff.Handed]) -> None:
        for m in moved:
            m.sock.setblocking(False)
            if m.unsent:
                m.sock.send(m.unsent)   # a giver that had output queued (another app kind); tiny by then
            self.server.metrics.taken_over(m.listener)
            if wsmove.is_websocket(m.state):
                self.server.adopt_websocket(m.sock, m.listener, m.state, m.unhandled)
            else:   # an idle connection (no state) or a moving response (streammove.py)
                self.server.adopt(m.sock, m.listener, m.unhandled, m.state)

    @property
    def giving(self) -> bool:
        """Return True while a taker is in play: connections wait to move rather than close."""
        return self.giver is not None and self.giver.targets > 0

    def start(self) -> None:
        """We drain: stop taking, find the takers, move every idle connection now."""
        if self.taker is not None:
            self.server.loop.remove_reader(self.taker.fileno())
            self._adopt(self.taker.close())
            self._count(self.taker.failures)
            self.taker = None
        if not self.enabled:
            return
        started = time.monotonic()
        self.giver = handoff.Giver()
        self.giver.find()
        self.found_at = started
        held = len(self.server.conns)
        moved = self.give([p for p in self.server.conns if p.movable()])
        logline.log(f"upgraderd worker generation {self.giver.generation} slot {self.giver.slot}: handed "
                    f"{moved} of {held} connection(s) to {self.giver.targets} worker(s) in "
                    f"{(time.monotonic() - started) * 1000:.0f} ms", "INFO")

    def give(self, protos: list[Movable]) -> int:
        """Offer idle connections to the takers; return how many moved."""
        if not protos or not self.giving:
            return 0
        assert self.giver is not None
        offers, ready = [], []
        for proto in protos:
            state = proto.handoff_state()
            if state is None:
                proto.not_moved()
                continue
            fd, pending = proto.detach()
            offers.append(handoff.Handed(socket.socket(fileno=os.dup(fd)), proto.listener, state, pending, b""))
            ready.append(proto)
        given = self.giver.give_many(offers) if offers else []
        for proto, offer, ok in zip(ready, offers, given):
            offer.sock.close()
            if ok:
                self.server.metrics.handed_off(proto.listener)
                proto.moved()
            else:
                proto.not_moved()
        self._count(self.giver.failures)
        if not self.giving:
            self.server.no_takers()
        return sum(given)

    def give_websockets(self, deadline: float) -> None:
        """Move the WebSockets that opted in and are at a message boundary; 1012 for the others.

        A WebSocket mid-message is retried on later ticks until `deadline`, then closed with 1012.
        """
        late = time.monotonic() >= deadline
        for ws in list(self.server.websockets_open):
            if ws.closed:
                continue
            if not self.giving or not ws.opted_in():
                ws.restart()
            elif ws.idle():
                self.give([ws])
            elif late:
                ws.restart()

    def retry(self) -> None:
        """While draining with connections left: give the idle ones, or look for takers again now and then."""
        if not self.enabled or self.giver is None or not self.server.conns:
            return
        if self.giving:   # those that were busy writing when they became idle
            self.give([p for p in self.server.conns if p.movable() and not p.stay])
            return
        if time.monotonic() - self.found_at < RETRY:
            return
        self.found_at = time.monotonic()
        if self.giver.find():
            for proto in self.server.conns:
                proto.stay = False
            self.give([p for p in self.server.conns if p.movable()])

    def close(self) -> None:
        """Release the channel sockets at exit."""
        if self.giver is not None:
            self.giver.close()
        if self.taker is not None:
            self.server.loop.remove_reader(self.taker.fileno())
            self.taker.close()

    def _count(self, failures: dict[str, int]) -> None:
        for reason, n in failures.items():
            self.server.metrics.handoff_failed(reason, n)
        failures.clear()
