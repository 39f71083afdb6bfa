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

import array
import os
import selectors
import socket
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

from upgraderd.contract import wire
from upgraderd.worker import peers
from upgraderd.worker.moved import Handed, identity
from upgraderd.worker.peers import Peer

MAX_FDS = 4
MAX_PENDING = 128  # offers acknowledged on one channel connection and not committed yet
MAX_PENDING_BYTES = wire.MAX_PENDING_BYTES
# Payload offered and not committed over all givers at once: two givers at their limit.
MAX_HELD_BYTES = 2 * MAX_PENDING_BYTES
OVER_CAPACITY = "over_capacity"
MAX_GENERATION = 999_999_999  # the largest UPGRADERD_GENERATION (contract/env.py `small_number`)


@dataclass
class _Inbound:
    """A giver connected to our channel: the offer it is sending, and those we acknowledged."""

    sock: socket.socket
    since: float
    head: wire.OfferHead | None = None  # the offer being received, until its payload is complete
    conn: socket.socket | None = None
    payload: bytearray = field(default_factory=bytearray)
    got: int = 0  # payload bytes of the offer being received, kept in `payload` unless `refusing`
    refusing: bool = False  # the offer being received is over the taker's total: read, not kept
    acked: list[Handed] = field(default_factory=list)  # ACK sent, COMMIT due, in offer order
    held: int = 0  # payload bytes of `acked` and of the offer being received (unless refused)
    arriving: bool = False  # it offered since its last END: more may come

    @property
    def busy(self) -> bool:
        """Return True while an offer is in progress or a COMMIT is due."""
        return self.head is not None or bool(self.acked)

    def complete(self) -> Handed:
        """Return the offer just received in full, and start afresh."""
        assert self.head is not None and self.conn is not None
        h, p = self.head, bytes(self.payload)
        moved = Handed(self.conn, h.listener, p[:h.state_len],
                       p[h.state_len:h.state_len + h.unhandled_len], p[h.state_len + h.unhandled_len:])
        self.head, self.conn, self.payload, self.got, self.refusing = None, None, bytearray(), 0, False
        return moved

    def discard(self) -> None:
        """Close our copies of every connection not committed to us (the giver keeps them)."""
        for moved in self.acked:
            moved.sock.close()
        if self.conn is not None:
            self.conn.close()
        self.head, self.conn, self.payload, self.acked, self.held = None, None, bytearray(), [], 0
        self.got, self.refusing = 0, False


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
        self.sock, self._inode = _bind(self.name)
        self._sel = selectors.EpollSelector()
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._peers: dict[int, _Inbound] = {}

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
            _unlink_if(self.name, self._inode)
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
            inb = _Inbound(conn, self.clock())
            self._peers[conn.fileno()] = inb
            self._sel.register(conn, selectors.EVENT_READ, inb)

    def _evict_idle(self) -> bool:
        """Close the longest-idle peer with nothing in flight to make room; return False if none."""
        idle = [inb for inb in self._peers.values() if not inb.busy]
        if not idle:
            return False
        self._drop(min(idle, key=lambda inb: inb.since), [], "idle_giver")
        return True

    def _serve_peer(self, inb: _Inbound, out: list[Handed]) -> None:
        while inb.sock.fileno() >= 0:
            try:
                msg, fds = _receive(inb.sock)
            except (BlockingIOError, InterruptedError):
                return
            except wire.Malformed:
                self._drop(inb, out, "malformed")
                return
            except OSError:
                self._drop(inb, out, "abandoned" if inb.busy else None)
                return
            if not msg:
                _close_fds(fds)
                self._drop(inb, out, "abandoned" if inb.busy else None)
                return
            try:
                self._on_message(inb, msg, fds, out)
            except wire.Malformed:
                self._drop(inb, out, "malformed")
                return
            finally:
                _close_fds(fds)

    def _on_message(self, inb: _Inbound, msg: bytes, fds: list[int], out: list[Handed]) -> None:
        kind = wire.kind_of(msg)
        inb.since = self.clock()
        if kind == wire.END and not inb.busy and not fds and msg == wire.encode(wire.END):
            inb.arriving = False
            return
        if kind == wire.OFFER and inb.head is None and len(fds) == 1 and len(inb.acked) < MAX_PENDING:
            inb.arriving = True
            head, first = wire.decode_offer(msg)
            if inb.held + head.total > MAX_PENDING_BYTES:
                raise wire.Malformed("more pending payload than a giver may hold")
            inb.conn = _tcp_connection(fds.pop())
            inb.head = head
            inb.refusing = self.held + head.total > self.max_held_bytes
            inb.held += 0 if inb.refusing else head.total
            self._keep(inb, first)
        elif kind == wire.DATA and inb.head is not None and not fds:
            self._keep(inb, wire.data_of(msg))
        elif kind == wire.COMMIT and inb.acked and not fds and msg == wire.encode(wire.COMMIT):
            moved = inb.acked.pop(0)
            inb.held -= len(moved.state) + len(moved.unhandled) + len(moved.unsent)
            out.append(moved)
            return
        else:
            raise wire.Malformed(f"unexpected {kind!r}")
        assert inb.head is not None
        if inb.got > inb.head.total:
            raise wire.Malformed("more payload than announced")
        if inb.got == inb.head.total:
            self._decide(inb)

    @staticmethod
    def _keep(inb: _Inbound, data: bytes) -> None:
        """Count `data` as received; keep it unless the offer is being refused."""
        inb.got += len(data)
        if not inb.refusing:
            inb.payload += data

    def _decide(self, inb: _Inbound) -> None:
        assert inb.head is not None
        refusing = inb.refusing
        reason = (OVER_CAPACITY if refusing else "draining" if not self.accepting else
                  "unknown_listener" if self.listeners is not None and inb.head.listener not in self.listeners
                  else "")
        moved = inb.complete()
        try:
            inb.sock.send(wire.encode(wire.REFUSE if reason else wire.ACK, reason))
        except OSError:
            reason = "giver_gone"  # it still holds the connection; our copy goes
        if refusing:
            self.failures["over_capacity"] += 1  # its bytes were never kept nor counted in `held`
        if reason:
            moved.sock.close()
            inb.held -= 0 if refusing else len(moved.state) + len(moved.unhandled) + len(moved.unsent)
        else:
            inb.acked.append(moved)

    def _drop(self, inb: _Inbound, out: list[Handed], reason: str | None) -> None:
        """Close one giver's channel; keep the connections whose COMMIT is already queued."""
        if inb.acked:
            for _ in range(_commits_queued(inb.sock)):
                if inb.acked:
                    out.append(inb.acked.pop(0))
        if reason is not None:
            self.failures[reason] += 1
        inb.discard()
        fd = inb.sock.fileno()
        if fd >= 0:
            self._sel.unregister(inb.sock)
            self._peers.pop(fd, None)
            inb.sock.close()


def _bind(name: str) -> tuple[socket.socket, int | None]:
    """Bind and listen on channel `name`; return the socket and, for a path, its inode.

    A path left by a worker of this slot that died is removed first: the
    channel directory is writable by our user alone, so it is ours.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if name.startswith("/"):
            try:
                if stat.S_ISSOCK(os.lstat(name).st_mode):
                    os.unlink(name)
            except FileNotFoundError:
                pass
        sock.bind(wire.address(name))
        sock.listen(64)
        return sock, os.lstat(name).st_ino if name.startswith("/") else None
    except OSError:
        sock.close()
        raise


def _unlink_if(name: str, inode: int | None) -> None:
    """Remove our channel's path, unless a successor in our slot has bound it since."""
    if inode is None:
        return
    try:
        if os.lstat(name).st_ino == inode:
            os.unlink(name)
    except OSError:
        pass


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Read one message and the fds that came with it; raise Malformed if truncated."""
    msg, anc, flags, _ = sock.recvmsg(wire.RECV_SIZE, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(data[:len(data) - len(data) % got.itemsize])
            fds.extend(got)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        _close_fds(fds)
        raise wire.Malformed("truncated message")
    return msg, fds


def _commits_queued(sock: socket.socket) -> int:
    """Shut our reading side, then count the COMMITs already queued.

    After shutdown(SHUT_RD) the kernel refuses the giver's next send (EPIPE),
    so a COMMIT is either in the queue now or was never accepted, and the
    giver then serves that connection on. Reading the queue dry settles which.
    """
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    commits = 0
    while True:
        try:
            msg, fds = _receive(sock)
        except (OSError, wire.Malformed):
            return commits
        _close_fds(fds)
        if not msg:
            return commits
        commits += msg == wire.encode(wire.COMMIT)


def _tcp_connection(fd: int) -> socket.socket:
    """Wrap `fd` if it is a connected TCP (or Unix stream) socket; close it and raise Malformed otherwise."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        raise wire.Malformed("the fd is not a socket") from None
    try:
        ok = sock.family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX) and sock.type == socket.SOCK_STREAM
        sock.getpeername()
    except OSError:
        ok = False
    if not ok:
        sock.close()
        raise wire.Malformed("the fd is not a connected TCP socket")
    return sock


def _close_fds(fds: list[int]) -> None:
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass

