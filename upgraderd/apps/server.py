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
`drain.orphan_grace`, then drain (upgraderd/worker/outlive.py).

With hand-off on, the worker also opens its hand-off channel before READY=1
and serves the connections older workers give it (`Moves._adopt`, apps/moves.py).

The data path (bench/seed_echo.py compares it with a C++ server) is
described in upgraderd/apps/conn.py. Work not tied to one connection (counts
in the metric files, hand-off timeouts, the parent check) runs every
HOUSEKEEPING seconds while busy.
"""

from __future__ import annotations

import _socket
import errno
import select
import signal
import socket
import time
from types import FrameType
from typing import Callable

from upgraderd import worker
from upgraderd.worker.outlive import OrphanWatch
from upgraderd.apps.connmetrics import ACCEPTED, CLOSED, RX, TX, ConnectionMetrics
from upgraderd.apps.datagrams import DatagramListener, is_udp
from upgraderd.apps.conn import IN, NOWAIT, OUT, Conn as Conn, ConnectionProtocol as ConnectionProtocol, Listener, \
    close_socket, has_unread
from upgraderd.apps.moves import Moves
from upgraderd.worker import handoff

READ_SIZE = 65536
HIGH_WATER = 1 << 20
# While busy, flush metrics, settle hand-off timeouts and check the parent about this often.
HOUSEKEEPING = 0.02
_TAKER = object()  # what the hand-off channel's fd is watched for
_WAKE = object()  # the signal wake-up socket's
_GIVER = object()  # the hand-off outbox's: it wakes the loop, whose passes give on while draining


class Server:
    """A single-threaded epoll loop over inherited listeners."""

    takes_handoffs = True  # False for the helper threads of `threads: N`: one channel per worker

    def __init__(self, listeners: dict[str, socket.socket],
                 factory: Callable[[str], ConnectionProtocol], idle_grace: float = 1.0,
                 announce: bool = True) -> None:
        self.listeners = listeners
        self.announce = announce
        self.factory = factory
        self.idle_grace = idle_grace
        self.ep = select.epoll()
        self.watched: dict[int, object] = {}  # fd: what it is, for every watched fd but connections'
        self.conns: dict[int, Conn] = {}
        self.draining_since: float | None = None
        self.stop_now = False
        self.orphan = OrphanWatch()
        self._wake_r, self._wake_w = socket.socketpair()
        self._signals_installed = False
        self.metrics = ConnectionMetrics(list(listeners), udp=any(is_udp(s) for s in listeners.values()))
        self._tally = {name: self.metrics.tally(name) for name in listeners}
        self.moves = Moves(self, self.takes_handoffs) if handoff.enabled() else None
        self._chores_due = 0.0  # monotonic time of the next housekeeping while busy

    def _install_signals(self) -> None:
        if self._signals_installed:
            return
        self._signals_installed = True
        self._watch_wake()
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(worker.drain_signal(), self._on_drain_signal)
        signal.signal(signal.SIGINT, self._on_int)
        if worker.drain_signal() != signal.SIGTERM:
            signal.signal(signal.SIGTERM, self._on_drain_signal)

    def _watch_wake(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._watch(self._wake_r.fileno(), _WAKE)

    def _watch(self, fd: int, what: object) -> None:
        self.watched[fd] = what
        self.ep.register(fd, IN)

    def _unwatch(self, fd: int) -> object:
        self.ep.unregister(fd)
        return self.watched.pop(fd, None)

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
            if is_udp(lsock):
                self._watch(lsock.fileno(), DatagramListener(name, lsock, self.factory(name), self.metrics))
                continue
            if lsock.family != socket.AF_UNIX:  # a Unix socket has no Nagle to switch off
                # Accepted sockets inherit it (Linux): no setsockopt per connection.
                lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._watch(lsock.fileno(), Listener(name, lsock, self._tally[name]))
        if self.moves is not None:
            self.moves.open()  # before READY=1: a successor may give to us as soon as we are ready
        if self.announce:
            worker.ready(f"serving {', '.join(self.listeners)}")
        self._loop()
        for conn in list(self.conns.values()):
            self._close(conn)
        if self.moves is not None:
            self.moves.close()
        self.metrics.flush()
        return 0

    def _loop(self) -> None:
        conns, watched, poll, monotonic = self.conns, self.watched, self.ep.poll, time.monotonic
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        busy = False  # served something since the last housekeeping
        while not self.stop_now:
            if self.draining_since is None:
                timeout = HOUSEKEEPING if busy else 0.5
            else:
                if self.draining_since == -1.0:
                    self._start_drain()
                if self._drained():
                    return
                timeout = self._drain_timeout()
            events = poll(timeout)
            for fd, mask in events:
                conn = conns.get(fd)
                if conn is None:
                    lis = watched.get(fd)
                    if type(lis) is not Listener:
                        self._dispatch(fd, mask)
                        continue
                    try:  # one connection per wake-up: spares the EAGAIN that ends a batch
                        sock = _socket.socket(*lis.kind, lis.take()[0])
                    except OSError as e:
                        self._not_accepted(e)
                        continue
                    self._accepted(sock, lis)
                    continue
                if mask != IN or not conn.mirror or conn.out:
                    self._serve_conn(conn, mask)
                    continue
                # A mirror (echo) with nothing queued: the reply is what we read. Most events.
                sock = conn.sock
                try:
                    n = sock.recv_into(buf, 0, NOWAIT)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    self._close(conn)
                    continue
                if not n:
                    self._close(conn)  # the client closed, and nothing is left to send
                    continue
                try:
                    sent = sock.send(view[:n], NOWAIT)
                except (BlockingIOError, InterruptedError):
                    sent = 0  # the client does not read: queue it all
                except OSError:
                    self._close(conn)
                    continue
                tally = conn.tally
                tally[RX] += n
                tally[TX] += sent
                if sent < n:
                    conn.out += view[sent:n]
                    self.flush(conn)
            if not events or self.draining_since is not None or monotonic() >= self._chores_due:
                self._chores()
                busy = False
            else:
                busy = True

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

    def _dispatch(self, fd: int, mask: int) -> None:
        what = self.watched.get(fd)
        if isinstance(what, DatagramListener):
            what.readable()
        elif what is _TAKER:
            assert self.moves is not None
            self.moves.poll()
        elif what is _WAKE:
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass

    def _serve_conn(self, conn: Conn, mask: int) -> None:
        if mask & ~OUT:  # readable, or an error or hang-up, which a read reports
            self._read(conn)
        if mask & ~IN and conn.sock.fileno() >= 0:
            self.flush(conn)

    def _accept(self, lis: Listener) -> None:
        """Accept every connection queued on `lis` (at drain)."""
        while True:
            try:
                sock = _socket.socket(*lis.kind, lis.take()[0])
            except OSError as e:
                if self._not_accepted(e):
                    continue
                return
            self._accepted(sock, lis)

    @staticmethod
    def _not_accepted(e: OSError) -> bool:
        """Return True if the next accept() may succeed, False if the queue is empty or must wait."""
        if isinstance(e, (BlockingIOError, InterruptedError)):
            return isinstance(e, InterruptedError)
        if e.errno in (errno.ECONNABORTED, errno.EPROTO):
            return True  # that one is gone; the next may be there
        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            return False  # leave the rest queued; the kernel keeps them
        raise e

    def _accepted(self, sock: _socket.socket, lis: Listener) -> None:
        """Serve a connection just accepted on `lis`."""
        conn = Conn(sock, lis.mirror or self.factory(lis.name), lis.name, lis.tally)
        if conn.mirror:
            lis.mirror = conn.proto  # stateless: one for all of this listener's connections
        lis.tally[ACCEPTED] += 1
        if self.draining_since is not None and not self._giving():
            conn.proto.drain()
        fd = sock.fileno()
        self.conns[fd] = conn
        self.ep.register(fd, IN)

    def track(self, conn: Conn) -> None:
        """Serve `conn` from this loop: watch it for reading."""
        conn.tally = self._tally[conn.listener]
        self.conns[conn.sock.fileno()] = conn
        self.ep.register(conn.sock.fileno(), IN)
        conn.events = IN

    def _read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(READ_SIZE, NOWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.last_io = time.monotonic()
        if not data:
            conn.eof = True
            self.flush(conn)
            return
        conn.tally[RX] += len(data)
        reply = conn.proto.received(data)
        if conn.out or not reply:
            conn.out += reply
            self.flush(conn)
            return
        # Nothing queued before it: send the reply now, and queue only what the kernel left.
        try:
            n = conn.sock.send(reply, NOWAIT)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._close(conn)
            return
        conn.tally[TX] += n
        if n < len(reply):
            conn.out += memoryview(reply)[n:]
            self.flush(conn)
        elif conn.events != IN or conn.proto.closing():
            self.flush(conn)

    def flush(self, conn: Conn) -> None:
        """Send what `conn` has queued; close it once done, else watch it for what it waits for."""
        while conn.out:
            try:
                n = conn.sock.send(conn.out, NOWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(conn)
                return
            del conn.out[:n]
            conn.tally[TX] += n
            conn.last_io = time.monotonic()
        if not conn.out and (conn.eof or conn.proto.closing()):
            self._close(conn)
            return
        want = 0 if len(conn.out) >= HIGH_WATER or conn.eof else IN
        if conn.out:
            want |= OUT
        if want != conn.events:
            fd = conn.sock.fileno()
            if not conn.events:
                self.ep.register(fd, want)
            elif want:
                self.ep.modify(fd, want)
            else:
                self.ep.unregister(fd)
            conn.events = want

    def _close(self, conn: Conn) -> None:
        sock = conn.sock
        fd = sock.fileno()
        if fd < 0:
            return
        if conn.shared and conn.events:
            self.ep.unregister(fd)  # another process's copy would keep it in our epoll set
        self.conns.pop(fd, None)
        close_socket(sock)
        conn.tally[CLOSED] += 1

    def _start_drain(self) -> None:
        self.draining_since = time.monotonic()
        self.metrics.draining()
        for lsock in self.listeners.values():
            what = self._unwatch(lsock.fileno())
            if isinstance(what, DatagramListener):
                what.drain()  # UDP: answer what is queued now, close our fd (datagrams.py)
                continue
            assert isinstance(what, Listener)
            # Take what is queued before closing: if ours is the last reference to a SO_REUSEPORT
            # socket (a retired slot), the kernel resets whatever is left. O_NONBLOCK belongs to
            # the open file description that every generation shares: re-assert it, so that
            # another program's setting can never make this a blocking accept() on an empty queue.
            lsock.setblocking(False)
            self._accept(what)
            lsock.close()
        if self.moves is not None:
            self.moves.start_giving()
        if not self._giving():
            for conn in self.conns.values():
                conn.proto.drain()

    def _giving(self) -> bool:
        return self.moves is not None and self.moves.giving

    # -- hand-off (upgraderd/apps/moves.py) --

    def watch_handoff(self, fd: int, taker: bool) -> None:
        """Watch the hand-off channel's fd (`taker`) or the outbox's in this loop."""
        self._watch(fd, _TAKER if taker else _GIVER)

    def unwatch_handoff(self, fd: int) -> None:
        """Stop watching a hand-off fd."""
        self._unwatch(fd)

    def _drained(self) -> bool:
        assert self.draining_since is not None
        now = time.monotonic()
        for conn in list(self.conns.values()):
            if conn.proto.idle() and not conn.out and now - max(conn.last_io, self.draining_since) >= self.idle_grace \
                    and not has_unread(conn.sock):
                self._close(conn)
        return not self.conns and not (self.moves is not None and self.moves.moving)

    def _drain_timeout(self) -> float:
        """Wake for the next idle connection's grace deadline while draining, not at the next 0.5 s poll."""
        assert self.draining_since is not None
        due = [max(c.last_io, self.draining_since) + self.idle_grace for c in self.conns.values()
               if c.proto.idle() and not c.out]
        # A floor: a connection past its grace but kept (unread bytes) must not spin the loop.
        return max(0.005, min([time.monotonic() + 0.5, *due]) - time.monotonic())
