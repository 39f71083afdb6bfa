"""Accept what queued on a slot socket nobody serves, and give it to READY workers (core/rescue.py decides).

The master holds every slot's listening socket. When a slot's worker is dead
(back-off, or given up), `Rescuer.rescue()` accepts what the kernel queued on
that socket and hands each connection, as a giver on the workers' own
hand-off channels (docs/workers.md, section 8), to the READY workers of the
same generation. The worker's taker trusts its parent as a giver
(worker/peers.is_master).

- Nothing is accepted unless a taker of that generation listens: a
  connection with nowhere to go stays in the kernel's queue, where a
  respawned worker can still accept it, rather than in the master.
- Accepting never blocks the loop: the socket's file description is shared
  with workers, so O_NONBLOCK is set only for the accepts and then put back
  as it was, and only a socket that poll() says is readable is touched.
- Giving blocks (a taker answers within the giver's timeout), so it runs in
  one background thread. A connection no taker committed to is kept and
  offered again every RETRY seconds, to the READY takers of the latest plan,
  or, once that generation is gone, of the oldest generation with a channel
  open; only a master that exits closes what it still holds.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from upgraderd.contract.wire import Channel
from upgraderd.core.seams import Rescue, SocketKey
from upgraderd.worker import peers
from upgraderd.worker.giver import Giver
from upgraderd.worker.moved import Handed

log = logging.getLogger("upgraderd")

RETRY = 0.2          # seconds between two offers of a connection no taker committed to
MAX_ACCEPT = 1024    # per socket and call: a backlog is rarely deeper
MAX_HELD = 4096      # accepted and not handed over yet; past it, the rest waits in the kernel


@dataclass
class _Held:
    conn: socket.socket
    listener: str


class Rescuer:
    """The master's giving end for connections of slots without a worker."""

    def __init__(self, fileno_of: Callable[[SocketKey], int | None], master: int | None = None,
                 timeout: float = 2.0) -> None:
        self.fileno_of = fileno_of
        self.master = os.getpid() if master is None else master
        self.timeout = timeout
        self.failures: Counter[str] = Counter()
        self.given = 0
        self._held: list[_Held] = []
        self._target: Rescue | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._warned = 0   # connections left over at the last warning

    def rescue(self, plan: Rescue) -> list[int]:
        """Accept what is queued on `plan.sockets` when a taker of `plan` listens; return the counts."""
        counts = [0] * len(plan.sockets)
        with self._cond:
            self._target = plan
            room = MAX_HELD - len(self._held)
            if self._closed or room <= 0:
                return counts
        fds = [self.fileno_of(key) for key, _ in plan.sockets]
        if not any(fd is not None and _readable(fd) for fd in fds) or not self._channels(plan):
            return counts
        taken: list[_Held] = []
        for i, ((key, name), fd) in enumerate(zip(plan.sockets, fds)):
            if fd is None:
                continue
            conns = _accept_all(fd, min(MAX_ACCEPT, room - len(taken)))
            counts[i] = len(conns)
            taken += [_Held(c, name) for c in conns]
        if taken:
            with self._cond:
                self._held += taken
                self._cond.notify()
            self._start()
        return counts

    def close(self) -> None:
        """Stop the hand-over thread and close what it still holds (only at master exit)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(self.timeout * 2)
        with self._cond:
            held, self._held = self._held, []
        for h in held:
            h.conn.close()

    def holding(self) -> int:
        """Return how many accepted connections wait to be handed over."""
        with self._cond:
            return len(self._held)

    def _channels(self, plan: Rescue) -> list[Channel]:
        return [c for c in peers.listening_channels(self.master)
                if c.generation == plan.generation and c.slot in plan.takers]

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="upgraderd-rescue", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._held and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch, self._held, target = self._held, [], self._target
            try:
                left = self._give(batch, target)
            except Exception:  # a bug: keep the connections, log, and try again later
                log.exception("internal error while handing rescued connections over")
                left = batch
            if left:
                with self._cond:
                    self._held[:0] = left
                    self._cond.wait(RETRY)

    def _give(self, batch: list[_Held], target: Rescue | None) -> list[_Held]:
        """Offer `batch` to `target`'s takers; return what no taker committed to."""
        if target is None:
            return batch
        giver = Giver(master=self.master, timeout=self.timeout,
                      trust=lambda p, c: peers.child_of(p, self.master, c.generation))
        try:
            # Its generation's takers, else (it was replaced since) the oldest generation
            # with a channel open: the ACTIVE one, since a draining worker closes its own.
            if not giver.aim(self._channels(target)) and not giver.find():
                return batch
            given = giver.give_many([Handed(h.conn, h.listener) for h in batch])
        finally:
            giver.close()
            self.failures.update(giver.failures)
        left = []
        for h, ok in zip(batch, given):
            if ok:
                h.conn.close()
            else:
                left.append(h)
        self.given += len(batch) - len(left)
        if left and len(left) != self._warned:   # once per change, not every RETRY
            log.warning("%d rescued connection(s) not handed over yet (%s); offering them again every %gs",
                        len(left), ", ".join(f"{k} {n}" for k, n in sorted(giver.failures.items())) or "refused",
                        RETRY)
        self._warned = len(left)
        return left


def _readable(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def _accept_all(fd: int, limit: int) -> list[socket.socket]:
    """Accept up to `limit` queued connections on listening `fd` without blocking.

    The file description is shared with the workers, so its O_NONBLOCK flag is
    restored to what it was before returning.
    """
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    out: list[socket.socket] = []
    with socket.socket(fileno=os.dup(fd)) as lsock:
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            while len(out) < limit:
                try:
                    conn, _ = lsock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    log.warning("accepting a queued connection failed: %s", e)
                    break
                out.append(conn)
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return out
