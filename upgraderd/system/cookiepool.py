"""The socket pool of a `flows: cookie` listener: sockets that never move in their group.

The cookie program (flowcookie.py) names sockets by their index in the
port's SO_REUSEPORT group array, and closing a socket at index i moves the
group's LAST socket into i. Until the master attaches the rebuilt program,
datagrams whose cookie names that moved socket go to an index past the end,
where the kernel hashes over every socket: a live generation's flow could be
answered by another generation. So the sockets of a cookie group are a pool
whose members never close while a later one is open:

- A pool socket's key is (host, port, "udp/cookie", n), n its index in the
  group. It is OWNED by one worker key (host, port, "udp/cookie@GEN", slot),
  the key the core speaks of, or FREE.
- A worker (gen, slot) gets a free socket (the lowest index), or a newly
  bound one appended at the end when none is free.
- When its owner generation's workers have all exited and no ACTIVE slot
  serves it, a socket goes back to the pool, and its cookie leaves the
  program's table: it is free, and nothing steers a datagram to it.
- Only free sockets at the end of the group close, and only while the pool
  holds more free sockets than owned ones (after a reload: the drained
  generation's sockets stay for the next one), so no index ever shifts.

Datagrams that were still queued on a socket when it went back to the pool
are read by its next owner: after the old generation drained.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Sequence

from upgraderd.config.schema import ListenerSpec
from upgraderd.core.seams import SocketKey, key_address
from upgraderd.system import flowcookie, steering, udp

log = logging.getLogger("upgraderd")

MODE = "udp/cookie"     # the mode part of a pool socket's key: (host, port, MODE, index)


def is_pool(key: SocketKey) -> bool:
    """Return True if `key` names a socket of a cookie pool."""
    return key[2] == MODE


class Pool:
    """Which worker key owns which pool socket, across every cookie group of a ListenerSet."""

    def __init__(self) -> None:
        self.owner: dict[SocketKey, SocketKey] = {}     # pool socket -> worker key
        self._socket: dict[SocketKey, SocketKey] = {}   # worker key -> pool socket
        self.changes = 0                                # bumped by own() and free()

    def socket_of(self, key: SocketKey) -> SocketKey:
        """Return the pool socket worker `key` owns; any other key as it is."""
        return self._socket.get(key, key)

    def cookie_of(self, key: SocketKey) -> int | None:
        """Return the cookie the program maps to pool socket `key`; None when it is free."""
        owner = self.owner.get(key)
        return flowcookie.key_cookie(owner) if owner is not None else None

    def take(self, worker: SocketKey, members: Sequence[SocketKey]) -> SocketKey | None:
        """Give `worker` the first free socket of its group's `members`; None if none is free."""
        for key in members:
            if is_pool(key) and key not in self.owner:
                self.own(key, worker)
                return key
        return None

    def own(self, key: SocketKey, worker: SocketKey) -> None:
        """Record that pool socket `key` serves `worker`."""
        self.changes += 1
        self.owner[key] = worker
        self._socket[worker] = key

    def free(self, key: SocketKey) -> None:
        """Return `key` to the pool."""
        worker = self.owner.pop(key, None)
        if worker is not None:
            self.changes += 1
            self._socket.pop(worker, None)
            log.info("listener %s (%s, slot %d): its socket #%d is back in the pool",
                     key_address(worker), worker[2], worker[3], key[3])

    def surplus(self, members: Sequence[SocketKey]) -> list[SocketKey]:
        """Return the free sockets at the end of `members` to close, last first.

        Closing from the end moves no socket; it stops while the pool holds
        no more free sockets than owned ones, or at the first owned one.
        """
        owned = sum(1 for k in members if k in self.owner)
        free = sum(1 for k in members if is_pool(k)) - owned
        out: list[SocketKey] = []
        for key in reversed(members):
            if not is_pool(key) or key in self.owner or free <= owned:
                break
            out.append(key)
            free -= 1
        return out

    def new_key(self, host: str, port: int, members: Sequence[SocketKey]) -> SocketKey:
        """Return the key of a socket to append to a group of `members`."""
        return (host, port, MODE, 1 + max((k[3] for k in members if is_pool(k)), default=-1))


class Lending:
    """ListenerSet's part for cookie pools: lend, park, free and trim their sockets."""

    _pool: Pool
    _groups: dict[Any, steering.Group[SocketKey]]
    _group_of: dict[SocketKey, Any]
    _parked: set[SocketKey]

    def _add(self, key: SocketKey, sock: socket.socket, backlog: int) -> None:
        raise NotImplementedError

    def _load(self, group: steering.Group[SocketKey], prog: steering.Program | None) -> str | None:
        raise NotImplementedError

    def _lend(self, spec: ListenerSpec, worker: SocketKey) -> None:
        """Give `worker` a free socket of its cookie pool, or one bound now at the group's end."""
        kind = (worker[0], worker[1], MODE)
        members = next((g.members for g in self._groups.values() if g.members[0][:3] == kind), [])
        if (key := self._pool.take(worker, members)) is None:
            key = self._pool.new_key(worker[0], worker[1], members)
            self._add(key, udp.bind(spec, located=True), spec.backlog)
            self._pool.own(key, worker)
        self._reload(key)   # the table now maps the new owner's cookie to `key`

    def _reload(self, key: SocketKey) -> None:
        group = self._groups[self._group_of[key]]
        if group.attached is not None:
            self._load(group, group.want())

    def _pool_park(self, wanted: set[SocketKey], held: set[SocketKey] | frozenset[SocketKey]
                   ) -> list[SocketKey]:
        """Free the pool sockets whose owner is neither wanted nor held; return those still held."""
        gone = {k: w for k, w in self._pool.owner.items() if w not in wanted}
        for key in [k for k, w in gone.items() if w not in held]:
            self._pool.free(key)
            self._parked.discard(key)
            group = self._groups[self._group_of[key]]
            if group.allowed is not None:
                group.allowed = group.allowed - {key}
            self._reload(key)
        return [k for k, w in gone.items() if w in held]

    def _pool_surplus(self) -> list[SocketKey]:
        """Return the free pool sockets that may close (at the end of their group)."""
        return [k for g in self._groups.values() if is_pool(g.members[0]) for k in self._pool.surplus(g.members)]
