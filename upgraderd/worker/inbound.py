"""A taker's side of one channel connection, and the socket work every taker does.

`Inbound` is one giver connected to a taker's channel (worker/taker.py): the
offer it is sending, and the connections acknowledged and not committed yet.
The functions bind and remove a channel, read one message with its fds, count
the COMMITs queued on a channel being dropped, and check that a received fd
is a connected stream socket.
"""

from __future__ import annotations

import array
import os
import socket
import stat
from dataclasses import dataclass, field

from upgraderd.contract import wire
from upgraderd.worker.moved import Handed

MAX_FDS = wire.MAX_BATCH


@dataclass
class Inbound:
    """A giver connected to our channel: the offer it is sending, and those we acknowledged."""

    sock: socket.socket
    since: float
    head: wire.OfferHead | None = None  # the offer being received, until its payload is complete
    conn: socket.socket | None = None
    payload: bytearray = field(default_factory=bytearray)
    got: int = 0  # payload bytes of the offer being received, kept in `payload` unless `refusing`
    refusing: bool = False  # the offer being received is over the taker's total: read, not kept
    acked: list[list[Handed]] = field(default_factory=list)  # ACK sent, COMMIT due: per offer or batch, in order
    pending: int = 0  # connections in `acked`
    held: int = 0  # payload bytes of `acked` and of the offer being received (unless refused)
    arriving: bool = False  # it offered since its last END: more may come

    @property
    def busy(self) -> bool:
        """Return True while an offer is in progress or a COMMIT is due."""
        return self.head is not None or bool(self.acked)

    def complete(self) -> Handed:
        """Return the offer just received in full, and start afresh."""
        assert self.head is not None and self.conn is not None
        moved = Handed(self.conn, self.head.listener, *self.head.split(bytes(self.payload)))
        self.head, self.conn, self.payload, self.got, self.refusing = None, None, bytearray(), 0, False
        return moved

    def discard(self) -> None:
        """Close our copies of every connection not committed to us (the giver keeps them)."""
        for group in self.acked:
            for moved in group:
                moved.sock.close()
        if self.conn is not None:
            self.conn.close()
        self.head, self.conn, self.payload, self.acked, self.held = None, None, bytearray(), [], 0
        self.pending = 0
        self.got, self.refusing = 0, False


def bind(name: str) -> tuple[socket.socket, int | None]:
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


def unlink_if(name: str, inode: int | None) -> None:
    """Remove our channel's path, unless a successor in our slot has bound it since."""
    if inode is None:
        return
    try:
        if os.lstat(name).st_ino == inode:
            os.unlink(name)
    except OSError:
        pass


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Read one message and the fds that came with it; raise Malformed if truncated."""
    msg, anc, flags, _ = sock.recvmsg(wire.RECV_SIZE, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(data[:len(data) - len(data) % got.itemsize])
            fds.extend(got)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_fds(fds)
        raise wire.Malformed("truncated message")
    return msg, fds


def commits_queued(sock: socket.socket) -> int:
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
            msg, fds = receive(sock)
        except (OSError, wire.Malformed):
            return commits
        close_fds(fds)
        if not msg:
            return commits
        commits += msg == wire.encode(wire.COMMIT)


def tcp_connection(fd: int) -> socket.socket:
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


def close_fds(fds: list[int]) -> None:
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass

