"""The event loop shared by the built-in workers: accept, read, write, drain.

We own the accept loop instead of using asyncio's `Server`: in CPython 3.11,
`Server.close()` can drop a connection accepted in the same loop iteration
(CPython issue #109564), and the client then sees a reset. Here a listener is
unregistered and its fd closed between two loop passes, so nothing is ever
accepted and then forgotten. Whatever the kernel queued but this worker did
not accept stays on the socket, which the master and the next generation
still hold.

Order at start-up: signal handlers first, then listeners, then READY=1. A
worker that said READY=1 before its drain handler existed could be killed by
SIGTERM's default action with connections in hand.

Drain (the drain signal, SIGTERM by default): stop accepting; with
`drain.handoff: auto`, hand every connection that can move to the ACTIVE
generation (upgraderd/apps/moves.py); tell the protocol of every connection
left (HTTP answers the next request with `Connection: close`), let idle
connections go after a grace period, exit when none is left. SIGINT: exit
at once. If the master dies (our parent changes) we serve on for
`drain.orphan_grace`, then drain (upgraderd/worker/orphan.py).

With hand-off on, the worker also opens its hand-off channel before READY=1
and serves the connections older workers give it (`adopt`).

The data path is short (bench/seed_echo.py compares it with a C++ server): a
reply is sent straight from the read, and watched for writing only if the
kernel did not take it all; work not tied to one connection (byte counts in the
metric files, hand-off timeouts, the parent check) runs every HOUSEKEEPING
seconds while busy.
"""

from __future__ import annotations

import errno
import selectors
import signal
import socket
import time
from types import FrameType
from typing import Callable

from upgraderd import worker
from upgraderd.worker.orphan import OrphanWatch
from upgraderd.apps.connmetrics import RX, TX, ConnectionMetrics
from upgraderd.apps.datagrams import DatagramListener, is_udp
from upgraderd.apps.conn import Conn as Conn, ConnectionProtocol as ConnectionProtocol
from upgraderd.apps.moves import Movable, Moves
from upgraderd.worker import handoff

READ_SIZE = 65536
HIGH_WATER = 1 << 20
ACCEPT_BATCH = 64
# While connections keep the loop busy, flush metrics, settle hand-off timeouts and
# check the parent at most this often (every idle pass does it too).
HOUSEKEEPING = 0.02
_TAKER = object()  # selector data of the hand-off channel


class Server:
    """A single-threaded selectors loop over inherited listeners."""

    takes_handoffs = True  # False for the helper threads of `threads: N`: one channel per worker

    def __init__(self, listeners: dict[str, socket.socket],
                 factory: Callable[[str], ConnectionProtocol], idle_grace: float = 1.0,
                 announce: bool = True) -> None:
        self.listeners = listeners
        self.announce = announce
        self.factory = factory
        self.idle_grace = idle_grace
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, Conn] = {}
        self.draining_since: float | None = None
        self.stop_now = False
        self.orphan = OrphanWatch()
        self._wake_r, self._wake_w = socket.socketpair()
        self._signals_installed = False
        self.metrics = ConnectionMetrics(list(listeners), udp=any(is_udp(s) for s in listeners.values()))
        self._tally = {name: self.metrics.tally(name) for name in listeners}
        self._kinds: dict[str, tuple[int, int, int]] = {}  # listener: (family, type, proto) to accept with
        self.moves = Moves(self, self.takes_handoffs) if handoff.enabled() else None
        self._chores_due = 0.0  # monotonic time of the next housekeeping while busy
        self._chores_owed = False  # a pass served connections since the last housekeeping

    def _install_signals(self) -> None:
        if self._signals_installed:
            return
        self._signals_installed = True
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        signal.signal(worker.drain_signal(), self._on_drain_signal)
        signal.signal(signal.SIGINT, self._on_int)
        if worker.drain_signal() != signal.SIGTERM:
            signal.signal(signal.SIGTERM, self._on_drain_signal)

    def _on_drain_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.draining_since is None:
            self.draining_since = -1.0  # acted on by the loop, outside the handler

    def _on_int(self, signum: int, frame: FrameType | None) -> None:
        self.stop_now = True

    def serve(self) -> int:
        """Serve until drained; return the exit code."""
        self._install_signals()
        for name, lsock in self.listeners.items():
            lsock.setblocking(False)
            udp = DatagramListener(name, lsock, self.factory(name), self.metrics) if is_udp(lsock) else None
            self.sel.register(lsock, selectors.EVENT_READ, name if udp is None else udp)
        if self.moves is not None:
            self.moves.open()  # before READY=1: a successor may give to us as soon as we are ready
        if self.announce:
            worker.ready(f"serving {', '.join(self.listeners)}")
        while not self.stop_now:
            if self.draining_since == -1.0:
                self._start_drain()
            if self.draining_since is not None and self._drained():
                break
            events = self.sel.select(timeout=self._timeout())
            for key, mask in events:
                if mask == selectors.EVENT_READ and isinstance(key.data, Conn):
                    self._read(key.data)  # most events: spare the _dispatch call
                else:
                    self._dispatch(key, mask)
            if not events or self.draining_since is not None or time.monotonic() >= self._chores_due:
                self._chores()
            else:
                self._chores_owed = True
                if self.metrics.dirty:
                    self.metrics.flush()  # connection counts every pass: a SIGKILL may come at any time
        for conn in list(self.conns.values()):
            self._close(conn)
        if self.moves is not None:
            self.moves.close()
        self.metrics.flush()
        return 0

    def _chores(self) -> None:
        """Everything not tied to one connection: every pass while draining, else now and then."""
        if self.moves is not None:
            self.moves.poll()  # also on its own readiness (_dispatch); here for its timeouts
            if self.draining_since is not None:
                self.moves.give_ready()
        self.metrics.flush()
        if self.draining_since is None and self.orphan.should_drain():
            self.draining_since = -1.0
        self._chores_due = time.monotonic() + HOUSEKEEPING
        self._chores_owed = False

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        data = key.data
        if isinstance(data, Conn):  # the common case first
            if mask & selectors.EVENT_READ:
                self._read(data)
            if mask & selectors.EVENT_WRITE and data.sock.fileno() >= 0:
                self._flush(data)
        elif isinstance(data, str):
            self._accept(key.fileobj, data)  # type: ignore[arg-type]
        elif isinstance(data, DatagramListener):
            data.readable()
        elif data is _TAKER:
            assert self.moves is not None
            self.moves.poll()
        elif key.fileobj is self._wake_r:
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass

    def _accept(self, lsock: socket.socket, name: str) -> bool:
        """Accept up to a batch; return True once the queue is empty."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock = self._accept_one(lsock, name)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return True  # leave the rest queued; the kernel keeps them
                raise
            sock.setblocking(False)
            if self._kinds[name][0] != socket.AF_UNIX:  # a Unix socket has no Nagle to switch off
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(sock, self.factory(name), name)
            self.metrics.accepted(name)
            if self.draining_since is not None and not self._giving():
                conn.proto.drain()
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, conn)
            if self.draining_since is None:
                self._read(conn)  # a client often writes at once: spare a loop pass (EAGAIN if not)
        return False

    def _accept_one(self, lsock: socket.socket, name: str) -> socket.socket:
        """Return `lsock.accept()[0]`, without its two enum conversions per call (CPython 3.11: ~6 us)."""
        kind = self._kinds.get(name) or self._kinds.setdefault(name, (lsock.family, lsock.type, lsock.proto))
        raw = getattr(lsock, "_accept", None)  # CPython's; it is what accept() calls
        if raw is None:
            return lsock.accept()[0]
        return socket.socket(*kind, raw()[0])

    def _read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.last_io = time.monotonic()
        if not data:
            conn.eof = True
            self._flush(conn)
            return
        tally = self._tally[conn.listener]
        tally[RX] += len(data)
        reply = conn.proto.received(data)
        if conn.out or not reply:
            conn.out += reply
            self._flush(conn)
            return
        # Nothing queued before it: send the reply now, and queue only what the kernel left.
        try:
            n = conn.sock.send(reply)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._close(conn)
            return
        tally[TX] += n
        if n < len(reply):
            conn.out += memoryview(reply)[n:]
            self._flush(conn)
        elif conn.events != selectors.EVENT_READ or conn.proto.closing():
            self._flush(conn)

    def _flush(self, conn: Conn) -> None:
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(conn)
                return
            del conn.out[:n]
            self._tally[conn.listener][TX] += n
            conn.last_io = time.monotonic()
        if not conn.out and (conn.eof or conn.proto.closing()):
            self._close(conn)
            return
        want = 0 if len(conn.out) >= HIGH_WATER or conn.eof else selectors.EVENT_READ
        if conn.out:
            want |= selectors.EVENT_WRITE
        if want != conn.events:
            conn.events = want
            if want:
                self.sel.modify(conn.sock, want, conn)
            else:
                self.sel.unregister(conn.sock)

    def _close(self, conn: Conn) -> None:
        fd = conn.sock.fileno()
        if fd < 0:
            return
        if conn.events:
            self.sel.unregister(conn.sock)
        self.conns.pop(fd, None)
        conn.sock.close()
        self.metrics.closed(conn.listener)

    def _start_drain(self) -> None:
        self.draining_since = time.monotonic()
        self.metrics.draining()
        for name, lsock in self.listeners.items():
            data = self.sel.unregister(lsock).data
            if isinstance(data, DatagramListener):
                data.drain()  # UDP: answer what is queued now, close our fd (datagrams.py)
                continue
            # Take what is queued before closing: if ours is the last reference to a
            # SO_REUSEPORT socket (a retired slot), the kernel resets whatever is left.
            # O_NONBLOCK belongs to the open file description, which every generation
            # shares; re-assert it so that another program's setting can never turn
            # this loop into a blocking accept() on an empty queue.
            lsock.setblocking(False)
            while not self._accept(lsock, name):
                pass
            lsock.close()
        if self.moves is not None:
            self.moves.start_giving()
        if not self._giving():
            for conn in self.conns.values():
                conn.proto.drain()

    def _giving(self) -> bool:
        return self.moves is not None and self.moves.giving

    # -- hand-off (upgraderd/apps/moves.py) --

    def register_taker(self, taker: handoff.Taker) -> None:
        """Watch the hand-off channel in this loop."""
        self.sel.register(taker.fileno(), selectors.EVENT_READ, _TAKER)

    def unregister_taker(self, taker: handoff.Taker) -> None:
        """Stop watching the hand-off channel."""
        self.sel.unregister(taker.fileno())

    def adopt(self, moved: handoff.Handed) -> None:
        """Serve a connection another worker handed to us, from where it left off."""
        sock = moved.sock
        sock.setblocking(False)
        proto = self.factory(moved.listener)
        if isinstance(proto, Movable):
            proto.restore(moved.state)
        conn = Conn(sock, proto, moved.listener)
        conn.out += moved.unsent
        self.metrics.taken_over(moved.listener)
        self.conns[sock.fileno()] = conn
        self.sel.register(sock, selectors.EVENT_READ, conn)
        if self.draining_since is not None and not self._giving():
            proto.drain()
        if moved.unhandled:
            conn.out += proto.received(moved.unhandled)
        self._flush(conn)

    def handed_off(self, conn: Conn) -> None:
        """Forget a connection that another worker now serves (it is already unregistered)."""
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        conn.sock.close()
        conn.events = 0
        self.metrics.handed_off(conn.listener)

    def _drained(self) -> bool:
        assert self.draining_since is not None
        now = time.monotonic()
        for conn in list(self.conns.values()):
            if conn.proto.idle() and not conn.out and now - max(conn.last_io, self.draining_since) >= self.idle_grace \
                    and not _has_unread(conn.sock):
                self._close(conn)
        return not self.conns

    def _timeout(self) -> float:
        """Wake for the next idle connection's grace deadline while draining, else poll the parent.

        The drain signal itself wakes the loop through the wakeup fd; without this
        a drained worker would notice its last idle connection's grace only at the
        next 0.5 s poll.
        """
        if self.draining_since is None or self.draining_since < 0:
            # Served connections since the last housekeeping: do it in time even if all goes quiet.
            return max(0.0, self._chores_due - time.monotonic()) if self._chores_owed else 0.5
        due = [max(c.last_io, self.draining_since) + self.idle_grace for c in self.conns.values()
               if c.proto.idle() and not c.out]
        # A floor: a connection past its grace but kept (unread bytes) must not spin the loop.
        return max(0.005, min([time.monotonic() + 0.5, *due]) - time.monotonic())


def _has_unread(sock: socket.socket) -> bool:
    """Return True if a request has arrived that the loop has not read yet.

    Closing a socket with unread data sends RST, and the request is lost: such a
    connection is left for the next pass to read and answer (with Connection: close).
    """
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return False
