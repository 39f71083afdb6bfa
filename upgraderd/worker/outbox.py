"""Non-blocking giving: offers in flight to the takers a `Giver` found, driven by the worker's loop.

A draining worker with thousands of connections cannot give them in one
blocking batch: while it waits on its takers' answers it serves none of its
connections, and a taker slow under load (2 s without an answer) was
dropped with everything that worker still held. An `Outbox` never blocks.
`offer()` queues a connection on one taker's lane, `pump()` sends what
the lane's socket takes, reads the answers that have arrived, and sends a
COMMIT for each ACK at once. It returns the connections that are the takers'
now and those that come back to us. The loop calls `pump()` when
`fileno()` is readable, and on each pass while draining. Connections not
in flight are served on meanwhile.

Batches: once a taker's ACK says it takes them (contract/wire.py), the
offers queued on its lane between two pumps go as BATCH messages of up to
MAX_BATCH connections, each answered by one ACK or REFUSE and committed by
one COMMIT. Until then, and for a connection whose payload does not fit in
one message, the lane sends single OFFERs, which every taker understands.

Flow control: a lane holds at most WINDOW offers and `BATCH_BYTES` of
payload that are not answered yet (the taker holds at most MAX_PENDING
acknowledged ones), so a slow taker gets no more than it can answer.

Invariants (those of the blocking giver, contract/wire.py):
- A connection is the taker's only once its COMMIT went out (the kernel took
  it). Until then its fd stays open here, and a lane that fails hands it
  back: the lane's socket is closed first, so the taker drops its copy and
  reads no later COMMIT.
- A lane fails when its taker refuses, stops reading, vanishes, answers
  out of turn, or has not answered for `timeout` seconds while offers were
  in flight (10 s: a new worker answers 8 givers' windows at once, and at a
  load average of 60 a process gets a few percent of a core). It is then dropped for the rest of this drain, counted by reason
  in `failures`.
"""

from __future__ import annotations

import array
import selectors
import socket
import time
from collections import Counter, deque
from typing import Callable

from upgraderd.contract import wire
from upgraderd.worker.giver import BATCH, BATCH_BYTES, Giver
from upgraderd.worker.moved import Handed

# Offers in flight to one taker. A lane moves a window per round trip (50-100 ms between two
# loops at load average 40). 128 (the taker's MAX_PENDING) lost every lane after its first
# window at 50,000 connections over 16 workers; 64, the blocking giver's batch, moved 10,000.
WINDOW = BATCH

_COMMIT = wire.encode(wire.COMMIT)


class _Lane:
    """One taker: the messages not sent yet, and the offers not answered yet, in order."""

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.out: deque[tuple[bytes, list[int], list[int]]] = deque()  # (message, fds to attach, keys it commits)
        self.waiting: deque[tuple[list[int], int]] = deque()  # (keys, payload size) per offer or batch, unanswered
        self.flight = 0                                     # connections in `waiting` and in the open batch
        self.held = 0                                       # their payload bytes
        self.progress = now                                 # last answer (or first offer) time
        self.batches = False                                # the taker said it takes BATCH messages
        self.entries: list[bytes] = []                      # the open batch: its entries, keys, fds, sizes
        self.keys: list[int] = []
        self.fds: list[int] = []
        self.entry_bytes = self.payload = 0

    def room(self, size: int = 0) -> bool:
        """Return True if one more offer (of `size` payload bytes) fits in this lane's window."""
        return self.flight < WINDOW and self.held + size <= BATCH_BYTES

    def close_batch(self) -> None:
        """Queue the open batch for sending (it is answered and committed as one)."""
        if self.entries:
            self.out.append((wire.encode_batch(self.entries), self.fds, []))
            self.waiting.append((self.keys, self.payload))
            self.entries, self.keys, self.fds, self.entry_bytes, self.payload = [], [], [], 0, 0


class Outbox:
    """Offers connections to a `Giver`'s takers without blocking (see the module docstring)."""

    def __init__(self, giver: Giver, timeout: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout, self.clock = timeout, clock
        self.failures: Counter[str] = Counter()
        self.given = 0
        self._sel = selectors.EpollSelector()
        self._lanes: list[_Lane] = []
        self._next = 0
        self._pending: dict[int, Handed] = {}    # key -> connection in flight (not committed yet)
        self._done: list[int] = []
        self._back: list[int] = []
        for sock in giver.take_sockets():
            sock.setblocking(False)
            lane = _Lane(sock, clock())
            self._lanes.append(lane)
            self._sel.register(sock, selectors.EVENT_READ, lane)

    def fileno(self) -> int:
        """Return an fd that is readable whenever a taker has answered (or gone)."""
        return self._sel.fileno()

    @property
    def targets(self) -> int:
        """Return how many takers are still in play."""
        return len(self._lanes)

    @property
    def in_flight(self) -> int:
        """Return how many connections are offered and not settled yet."""
        return len(self._pending)

    def has_room(self) -> bool:
        """Return True if some taker can take another offer now."""
        return any(lane.room() for lane in self._lanes)

    def offer(self, key: int, moving: Handed) -> bool:
        """Queue `moving` (stop reading it first) on the next taker with room; False: serve it on."""
        size = moving.size
        for _ in range(len(self._lanes)):
            lane = self._lanes[self._next % len(self._lanes)]
            self._next += 1
            if lane.room(size):   # with its bytes: the taker drops a giver past MAX_PENDING_BYTES
                return self._queue(lane, key, moving, size)
        return False

    def _queue(self, lane: _Lane, key: int, moving: Handed, size: int) -> bool:
        """Put `moving` in `lane`'s open batch, or queue it as an OFFER; False if it is too large to move."""
        entry = wire.batch_entry(moving.listener, moving.state, moving.unhandled, moving.unsent) \
            if lane.batches else None
        msgs: list[bytes] = []
        if entry is None:
            try:
                msgs = wire.encode_offer(moving.listener, moving.state, moving.unhandled, moving.unsent)
            except ValueError:
                self.failures["too_large"] += 1
                return False
        if not lane.waiting and not lane.entries:
            lane.progress = self.clock()
        lane.flight += 1
        lane.held += size
        self._pending[key] = moving
        if entry is None:
            lane.close_batch()
            lane.waiting.append(([key], size))
            lane.out.append((msgs[0], [moving.sock.fileno()], []))
            lane.out.extend((m, [], []) for m in msgs[1:])
            return True
        if not wire.batch_fits(lane.entry_bytes, len(lane.entries), entry):
            lane.close_batch()
        lane.entries.append(entry)
        lane.keys.append(key)
        lane.fds.append(moving.sock.fileno())
        lane.entry_bytes += len(entry)
        lane.payload += size
        return True

    def pump(self) -> tuple[list[int], list[int]]:
        """Send, read and commit what can be now; return (keys given, keys back to serve on)."""
        for key, _ in self._sel.select(0):
            self._read(key.data)
        now = self.clock()
        for lane in list(self._lanes):
            lane.close_batch()
            if lane.sock.fileno() >= 0:
                self._send(lane)
            if lane.sock.fileno() >= 0 and lane.waiting and now - lane.progress > self.timeout:
                self._fail(lane, "timeout")
        done, back, self._done, self._back = self._done, self._back, [], []
        self.given += len(done)
        return done, back

    def close(self) -> list[int]:
        """Drop every taker; return the keys of the connections in flight (serve them on)."""
        for lane in list(self._lanes):
            self._fail(lane, None)
        self._sel.close()
        back, self._back = self._back, []
        return back

    def _send(self, lane: _Lane) -> None:
        while lane.out:
            msg, fds, committed = lane.out[0]
            try:
                if fds:
                    lane.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                                      socket.MSG_DONTWAIT)
                else:
                    lane.sock.send(msg, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._fail(lane, "taker_gone")
                return
            lane.out.popleft()
            for key in committed:
                self._pending.pop(key, None)
                self._done.append(key)

    def _read(self, lane: _Lane) -> None:
        while lane.sock.fileno() >= 0:
            try:
                reply = lane.sock.recv(wire.RECV_SIZE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._fail(lane, "taker_gone")
                return
            try:
                kind = wire.kind_of(reply) if reply else b""
            except wire.Malformed:
                kind = b"?"
            if not reply or kind not in (wire.ACK, wire.REFUSE) or not lane.waiting:
                self._fail(lane, "taker_gone" if not reply else "malformed_reply")
                return
            keys, size = lane.waiting.popleft()
            lane.flight -= len(keys)
            lane.held -= size
            lane.progress = self.clock()
            if kind == wire.REFUSE:
                for key in keys:
                    self._pending.pop(key, None)
                    self._back.append(key)
                self._send(lane)        # the COMMITs of the offers it acknowledged before
                self._fail(lane, "refused")
                return
            lane.batches = lane.batches or wire.takes_batches(reply)
            lane.out.append((_COMMIT, [], keys))

    def _fail(self, lane: _Lane, reason: str | None) -> None:
        """Close the lane's socket (the taker drops whatever we did not commit), take those back."""
        if reason is not None:
            self.failures[reason] += 1
        if lane.sock.fileno() >= 0:
            self._sel.unregister(lane.sock)
            lane.sock.close()
        for key in [k for keys, _ in lane.waiting for k in keys] + [k for _, _, keys in lane.out for k in keys] \
                + lane.keys:
            if self._pending.pop(key, None) is not None:
                self._back.append(key)
        lane.waiting.clear()
        lane.out.clear()
        lane.entries, lane.keys, lane.fds, lane.flight, lane.held, lane.entry_bytes, lane.payload = \
            [], [], [], 0, 0, 0, 0
        if lane in self._lanes:
            self._lanes.remove(lane)
