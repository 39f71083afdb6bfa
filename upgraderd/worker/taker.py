"""The receiving end of hand-offs: a worker's channel, and the offers that arrive on it.

See upgraderd/worker/handoff.py for the API and upgraderd/contract/wire.py for
the exchange. Everything here is non-blocking: `Taker.poll()` does what the
channel has for it and returns. A peer that is not a worker of our master,
a malformed message, or a giver that stalls mid-offer is refused, counted in
`Taker.failures` and closed; nothing raises.

Memory: one giver may have MAX_PENDING_BYTES of payload offered and not
committed (more drops it), and all givers together `max_held_bytes`
(MAX_HELD_BYTES by default). An offer that would take the total past it is
read to its end without keeping its bytes, its fd closed, and REFUSEd with
`over_capacity`: the giver keeps that connection and serves it on (a refused
offer is a failed give, never a lost connection), and the refusal is counted.
Without the total, 64 trusted givers at their own limit could make one worker
hold 1 GiB.

Batches: our ACK says we take BATCH messages (contract/wire.py), and a
giver that read it may offer up to MAX_BATCH connections in one message,
answered by one ACK or REFUSE and committed by one COMMIT. A batch is taken
or refused whole: over the total, while closing, or if one of its
connections names a listener we do not have.

The end of a hand-off: a giver sends END once it has offered us everything
it meant to in one give (contract/wire.py). `Taker.arriving` counts the
givers that have begun to offer and not ended (by END, by closing the
channel, or by being dropped), so a broadcast server can hold delivery
until every moved connection has arrived: while a connection is still on
its way, a message delivered to those already here would miss it. A giver
that stalls holds nobody for long: `peer_timeout` drops it mid-offer,
`idle_timeout` between offers.
"""

from __future__ import annotations

import os
import selectors
import time
from collections import Counter
from typing import Callable, Iterable

from upgraderd.contract import wire
from upgraderd.worker import peers
from upgraderd.worker.moved import Handed, identity
from upgraderd.worker.inbound import Inbound, bind, close_fds, commits_queued, receive, tcp_connection, unlink_if
from upgraderd.worker.peers import Peer

MAX_PENDING = 128  # connections acknowledged on one channel connection and not committed yet
MAX_PENDING_BYTES = wire.MAX_PENDING_BYTES
# Payload offered and not committed over all givers at once: two givers at their limit.
MAX_HELD_BYTES = 2 * MAX_PENDING_BYTES
OVER_CAPACITY = "over_capacity"
MAX_GENERATION = 999_999_999  # the largest UPGRADERD_GENERATION (contract/env.py `small_number`)


class Taker:
    """The receiving end of hand-offs for this worker (non-blocking, poll-driven)."""

    def __init__(self, listeners: Iterable[str] | None = None, *, master: int | None = None,
                 trust: Callable[[Peer], bool] | None = None, max_peers: int = 64,
                 peer_timeout: float = 5.0, idle_timeout: float = 10.0,
                 max_held_bytes: int = MAX_HELD_BYTES, clock: Callable[[], float] = time.monotonic) -> None:
        gen, slot = identity()
        self.master = os.getppid() if master is None else master
        self.listeners = None if listeners is None else set(listeners)
        # Any generation of our master may give to us: an older one at its drain, a newer one
        # (a rolled-back canary) giving back to the generation it served beside.
        self.trust = trust or (lambda p: peers.trusted(p, self.master, max_generation=MAX_GENERATION)
                               or peers.is_master(p, self.master))
        self.name = wire.channel_name(self.master, gen, slot, peers.channel_dir())
        self.max_peers, self.peer_timeout, self.clock = max_peers, peer_timeout, clock
        self.idle_timeout, self.max_held_bytes = idle_timeout, max_held_bytes
        self.accepting = True
        self.failures: Counter[str] = Counter()
        self.messages = 0  # messages read from givers (a batch of 64 connections is three, with its answer)
        self.sock, self._inode = bind(self.name)
        self._sel = selectors.EpollSelector()
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._peers: dict[int, Inbound] = {}

    @property
    def held(self) -> int:
        """Return the payload bytes offered to us by every giver and not committed yet."""
        return sum(inb.held for inb in self._peers.values())

    def fileno(self) -> int:
        """Return an fd that is readable whenever `poll()` has work."""
        return self._sel.fileno()

    @property
    def arriving(self) -> int:
        """Return how many givers are handing connections to us now: each has offered one and
        has not yet said END nor gone. 0 after `poll()` means every connection offered so far
        has arrived (or stayed with its giver)."""
        return sum(inb.arriving for inb in self._peers.values())

    def poll(self) -> list[Handed]:
        """Do whatever the channel has for us without blocking; return the connections now ours."""
        out: list[Handed] = []
        for key, _ in self._sel.select(0):
            if key.data is None:
                self._accept_peers()
            else:
                self._serve_peer(key.data, out)
        now = self.clock()
        for inb in list(self._peers.values()):
            if inb.busy and now - inb.since > self.peer_timeout:
                self._drop(inb, out, "stalled_giver")
            elif not inb.busy and now - inb.since > self.idle_timeout:
                self._drop(inb, out, "idle_giver")
        return out

    def close(self) -> list[Handed]:
        """Stop taking; return connections whose COMMIT was already on its way."""
        out: list[Handed] = []
        self.accepting = False
        if self.sock.fileno() >= 0:
            self._sel.unregister(self.sock)
            self.sock.close()
            unlink_if(self.name, self._inode)
        for inb in list(self._peers.values()):
            self._drop(inb, out, None)
        self._sel.close()
        return out

    def _accept_peers(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ECONNABORTED and friends: that giver is gone
            if len(self._peers) >= self.max_peers and not self._evict_idle():
                self.failures["busy"] += 1
                conn.close()
                continue
            try:
                peer = peers.peer_of(conn)
            except OSError:
                conn.close()
                continue
            if not self.trust(peer):
                self.failures["untrusted_giver"] += 1
                conn.close()
                continue
            conn.setblocking(False)
            inb = Inbound(conn, self.clock())
            self._peers[conn.fileno()] = inb
            self._sel.register(conn, selectors.EVENT_READ, inb)

    def _evict_idle(self) -> bool:
        """Close the longest-idle peer with nothing in flight to make room; return False if none."""
        idle = [inb for inb in self._peers.values() if not inb.busy]
        if not idle:
            return False
        self._drop(min(idle, key=lambda inb: inb.since), [], "idle_giver")
        return True

    def _serve_peer(self, inb: Inbound, out: list[Handed]) -> None:
        while inb.sock.fileno() >= 0:
            try:
                msg, fds = receive(inb.sock)
            except (BlockingIOError, InterruptedError):
                return
            except wire.Malformed:
                self._drop(inb, out, "malformed")
                return
            except OSError:
                self._drop(inb, out, "abandoned" if inb.busy else None)
                return
            if not msg:
                close_fds(fds)
                self._drop(inb, out, "abandoned" if inb.busy else None)
                return
            self.messages += 1
            try:
                self._on_message(inb, msg, fds, out)
            except wire.Malformed:
                self._drop(inb, out, "malformed")
                return
            finally:
                close_fds(fds)

    def _on_message(self, inb: Inbound, msg: bytes, fds: list[int], out: list[Handed]) -> None:
        kind = wire.kind_of(msg)
        inb.since = self.clock()
        if kind == wire.END and not inb.busy and not fds and msg == wire.encode(wire.END):
            inb.arriving = False
            return
        if kind == wire.BATCH and inb.head is None and fds:
            self._take_batch(inb, msg, fds)
            return
        if kind == wire.OFFER and inb.head is None and len(fds) == 1 and inb.pending < MAX_PENDING:
            inb.arriving = True
            head, first = wire.decode_offer(msg)
            if inb.held + head.total > MAX_PENDING_BYTES:
                raise wire.Malformed("more pending payload than a giver may hold")
            inb.conn = tcp_connection(fds.pop())
            inb.head = head
            inb.refusing = self.held + head.total > self.max_held_bytes
            inb.held += 0 if inb.refusing else head.total
            self._keep(inb, first)
        elif kind == wire.DATA and inb.head is not None and not fds:
            self._keep(inb, wire.data_of(msg))
        elif kind == wire.COMMIT and inb.acked and not fds and msg == wire.encode(wire.COMMIT):
            group = inb.acked.pop(0)
            inb.held -= sum(moved.size for moved in group)
            inb.pending -= len(group)
            out.extend(group)
            return
        else:
            raise wire.Malformed(f"unexpected {kind!r}")
        assert inb.head is not None
        if inb.got > inb.head.total:
            raise wire.Malformed("more payload than announced")
        if inb.got == inb.head.total:
            self._decide(inb)

    @staticmethod
    def _keep(inb: Inbound, data: bytes) -> None:
        """Count `data` as received; keep it unless the offer is being refused."""
        inb.got += len(data)
        if not inb.refusing:
            inb.payload += data

    def _decide(self, inb: Inbound) -> None:
        assert inb.head is not None
        refusing = inb.refusing
        reason = (OVER_CAPACITY if refusing else "draining" if not self.accepting else
                  "unknown_listener" if self.listeners is not None and inb.head.listener not in self.listeners
                  else "")
        moved = inb.complete()
        if not self._answer(inb, reason):
            reason = "giver_gone"
        if refusing:
            self.failures["over_capacity"] += 1  # its bytes were never kept nor counted in `held`
        if reason:
            moved.sock.close()
            inb.held -= 0 if refusing else moved.size
        else:
            inb.acked.append([moved])
            inb.pending += 1

    @staticmethod
    def _answer(inb: Inbound, reason: str) -> bool:
        """Send ACK (saying we take batches) or REFUSE `reason`; return False if it could not be sent
        (the giver still holds the connections; our copies go)."""
        try:
            inb.sock.send(wire.encode(wire.REFUSE, reason) if reason else wire.encode(wire.ACK, wire.TAKES_BATCHES))
        except OSError:
            return False
        return True

    def _take_batch(self, inb: Inbound, msg: bytes, fds: list[int]) -> None:
        """Take or refuse a BATCH whole; raise Malformed (the caller closes the fds not taken)."""
        entries = wire.decode_batch(msg)
        if len(entries) != len(fds):
            raise wire.Malformed(f"a batch of {len(entries)} connections with {len(fds)} fds")
        if inb.pending + len(entries) > MAX_PENDING:
            raise wire.Malformed("more pending connections than a giver may hold")
        total = sum(head.total for head, _ in entries)
        if inb.held + total > MAX_PENDING_BYTES:
            raise wire.Malformed("more pending payload than a giver may hold")
        inb.arriving = True
        group: list[Handed] = []
        try:
            for head, payload in entries:
                group.append(Handed(tcp_connection(fds.pop(0)), head.listener, *head.split(payload)))
        except wire.Malformed:
            for moved in group:
                moved.sock.close()
            raise
        refusing = self.held + total > self.max_held_bytes
        reason = (OVER_CAPACITY if refusing else "draining" if not self.accepting else
                  "unknown_listener" if self.listeners is not None
                  and any(m.listener not in self.listeners for m in group) else "")
        if not self._answer(inb, reason):
            reason = "giver_gone"
        if refusing:
            self.failures["over_capacity"] += len(group)
        if reason:
            for moved in group:
                moved.sock.close()
        else:
            inb.acked.append(group)
            inb.pending += len(group)
            inb.held += total

    def _drop(self, inb: Inbound, out: list[Handed], reason: str | None) -> None:
        """Close one giver's channel; keep the connections whose COMMIT is already queued."""
        if inb.acked:
            for _ in range(commits_queued(inb.sock)):
                if inb.acked:
                    out.extend(inb.acked.pop(0))
        if reason is not None:
            self.failures[reason] += 1
        inb.discard()
        fd = inb.sock.fileno()
        if fd >= 0:
            self._sel.unregister(inb.sock)
            self._peers.pop(fd, None)
            inb.sock.close()
