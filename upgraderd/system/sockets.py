"""Bind, keep and close the master's listening sockets.

Every socket is bound by the master with SO_REUSEADDR (a restarted master does
not wait for TIME_WAIT to clear) and SO_REUSEPORT (a new socket for the same
address can be bound next to a live one, e.g. when a mode changes).

Sockets are keyed by (host, port, mode, slot), not by listener name:
- `reuseport`: one socket per worker slot. Slot i of every generation inherits
  socket i, so the kernel's per-socket accept queue outlives the generations.
- `shared`: one socket (slot 0) inherited by every worker.

Hazard: closing a SO_REUSEPORT socket makes the kernel reset the connections
still queued on it, unless net.ipv4.tcp_migrate_req=1 (Linux 5.14+). So a
socket is closed only when no live generation and not the current config use
it: a reload that keeps an address never closes or re-binds its sockets.

Steering (steering.py, steerer.py): `steer()` attaches to each port group a classic BPF
program that sends new connections only to the ready slots' sockets, so a
socket nobody accepts on (a new slot whose worker is not ready, a slot in
back-off, a retiring slot) queues nothing, and closing it later resets
nothing. The program names sockets by their index in the kernel's group
array, so the set tracks that order through every bind and close. For the
order to stay exact a socket must leave the group when the master says so:
a steered socket that a live worker still holds is parked (kept open,
steered away) by `retire()` until that worker is gone, and is then shut down
(which unhashes it even if a stray process still holds an fd) and closed.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Iterable

from upgraderd.config.schema import Config, ListenerSpec
from upgraderd.core.seams import Retired, SocketKey, is_udp, key_for
from upgraderd.system import cookiepool, flowcookie, steering, udp, unixsock
from upgraderd.system.steerer import GroupId, Steerer

log = logging.getLogger("upgraderd")

def bind(spec: ListenerSpec) -> socket.socket:
    """Bind and listen one TCP socket for `spec`, with SO_REUSEADDR and SO_REUSEPORT."""
    family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((spec.host, spec.port))
        sock.listen(spec.backlog)
    except OSError:
        sock.close()
        raise
    return sock


class ListenerSet(Steerer, cookiepool.Lending):
    """The master's sockets, by key. Only the master calls its methods."""

    def __init__(self) -> None:
        self._socks: dict[SocketKey, socket.socket] = {}
        self._backlog: dict[SocketKey, int] = {}
        self._group_of: dict[SocketKey, GroupId] = {}
        self._groups: dict[GroupId, steering.Group[SocketKey]] = {}
        self._parked: set[SocketKey] = set()
        # The socket files this master created (Unix listeners), removed when their socket closes.
        self._files: dict[SocketKey, unixsock.FileId] = {}
        # Steering programs the kernel refused; each such group is left unsteered.
        self.steer_refused = 0
        self._pool = cookiepool.Pool()   # a `flows: cookie` listener's sockets (cookiepool.py)
        # Bumped when a socket joins or leaves: with the pool's and the parked set, what the
        # last steer's wanted keys were computed from (steer runs every pass; most change nothing).
        self._membership = 0
        self._wanted: tuple[object, dict[GroupId, set[SocketKey]]] | None = None

    def ensure(self, cfg: Config, count: int | None = None,
               slots: Iterable[int] | None = None) -> list[SocketKey]:
        """Bind every socket `cfg` needs (for `slots`, default all) not bound yet; return the new keys.

        Raises OSError (with the address) if a bind fails; sockets bound by this
        call are closed again, so a failed reload leaves nothing behind.
        """
        n = cfg.workers.count if count is None else count
        wanted = list(range(n)) if slots is None else list(slots)
        opened: list[SocketKey] = []
        try:
            for spec in cfg.listeners:
                if spec.mode == "worker-bind" or spec.flows == "cookie":
                    continue  # a cookie listener's sockets are per generation: see child_fds
                for slot in sorted({key_for(spec, s)[3] for s in wanted}):
                    key = key_for(spec, slot)
                    if key in self._socks:
                        self._parked.discard(key)
                        self._relisten(key, spec.backlog)
                        if key in self._files:  # a reload may change the file's owner or mode
                            unixsock.set_access(spec, self._files[key])
                        continue
                    if spec.path is not None:
                        sock, self._files[key] = unixsock.bind(spec)
                    else:
                        sock = udp.bind(spec) if spec.protocol == "udp" else bind(spec)
                    self._add(key, sock, spec.backlog)
                    opened.append(key)
        except OSError as e:
            for key in reversed(opened):
                self._release(key)
            raise OSError(e.errno, f"cannot listen on {spec.address}: {e.strerror}") from None
        return opened

    def _add(self, key: SocketKey, sock: socket.socket, backlog: int) -> None:
        self._membership += 1
        self._socks[key] = sock
        self._backlog[key] = backlog
        name = sock.getsockname()
        unix = sock.family == socket.AF_UNIX
        gid: GroupId = (sock.family, str(name), 0, int(sock.type)) if unix else \
            (sock.family, str(name[0]), int(name[1]), int(sock.type))
        self._group_of[key] = gid
        # A listening socket joins its group at the end of the kernel's array.
        group = self._groups.setdefault(gid, steering.Group(refused=unix))
        group.join(key)
        if cookiepool.is_pool(key):
            group.cookie_of, group.cookie_program = self._pool.cookie_of, flowcookie.program

    def _relisten(self, key: SocketKey, backlog: int) -> None:
        if self._backlog.get(key) != backlog and not is_udp(key):
            self._socks[key].listen(backlog)
            self._backlog[key] = backlog

    def child_fds(self, cfg: Config, slot: int, gen: int = 0) -> tuple[int, ...]:
        """Return the fds worker `slot` of generation `gen` inherits, in `cfg.fd_listeners` order.

        A `flows: cookie` listener's (gen, slot) gets a socket of its pool here, the first time.
        """
        for spec in cfg.fd_listeners:
            if spec.flows == "cookie" and self._pool.socket_of(key := key_for(spec, slot, gen)) == key:
                self._lend(spec, key)
        return tuple(self._socks[self._pool.socket_of(key_for(spec, slot, gen))].fileno()
                     for spec in cfg.fd_listeners)

    def keep_only(self, wanted: set[SocketKey]) -> list[SocketKey]:
        """Close every socket whose key is not in `wanted`; return the closed keys."""
        return self.retire(wanted).closed

    def retire(self, wanted: set[SocketKey], held: set[SocketKey] | frozenset[SocketKey] = frozenset()
               ) -> Retired:
        """Close every socket not in `wanted`; park the steered ones a live worker still `held`s.

        A parked socket stays open and gets no new connection, so its worker
        can accept what is queued; a later call closes it once it is not held.
        """
        gone = [k for k in self._socks if k not in wanted and not cookiepool.is_pool(k)]
        park = [k for k in gone if k in held and self._steered(k)] + self._pool_park(wanted, held)
        for key in park:
            if key not in self._parked:
                self._parked.add(key)
                self._exclude(key)
        closing = [k for k in gone if k not in park] + self._pool_surplus()
        unsafe = [k for k in closing if not self._steered_away(k)]
        # Grouped before any release: a released key leaves _group_of.
        by_group: dict[GroupId, list[SocketKey]] = {}
        for k in closing:
            by_group.setdefault(self._group_of[k], []).append(k)
        for gid, keys in by_group.items():
            for key in self._groups[gid].order_of(keys):
                self._release(key, shut=key not in held)
        return Retired(closing, park, unsafe)

    def _steered(self, key: SocketKey) -> bool:
        return self._groups[self._group_of[key]].attached is not None

    def _steered_away(self, key: SocketKey) -> bool:
        group = self._groups[self._group_of[key]]
        return group.attached is not None and group.allowed is not None and key not in group.allowed

    def _exclude(self, key: SocketKey) -> None:
        group = self._groups[self._group_of[key]]
        # The last allowed socket keeps its program, as steering to nothing does:
        # detaching would spread new connections over every socket instead.
        if group.allowed is not None and key in group.allowed and len(group.allowed) > 1:
            group.allowed = group.allowed - {key}
            self._load(group, group.want())

    def _release(self, key: SocketKey, shut: bool = True) -> None:
        """Close `key`, keeping its group's program right on both sides of the close."""
        gid = self._group_of[key]
        group = self._groups[gid]
        steered = group.attached is not None
        if steered:
            self._load(group, group.leave_plan(key))
        self._membership += 1
        del self._group_of[key]
        sock = self._socks.pop(key)
        if key in self._files:
            unixsock.remove(key[0], self._files.pop(key))
        self._backlog.pop(key, None)
        self._parked.discard(key)
        if steered and is_udp(key):
            # shutdown() does not unhash a datagram socket: it leaves at its last close.
            group.known = group.known and shut
        elif steered:
            if shut:
                # Unhash now even if a stray process holds an fd: the group's
                # order then changes here, where it is tracked, and not later.
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
        elif shut is False:
            # It leaves the group only when its last holder closes it: from
            # then on this group's order is a guess, and it is never steered.
            group.known = False
        sock.close()
        group.leave(key)
        if group.members:
            self._load(group, group.want())
        else:
            del self._groups[gid]

    def export(self) -> list[dict[str, Any]]:
        """Return every socket as {key, fd, backlog, pos, parked}, for a master re-exec."""
        return [{"key": list(k), "fd": s.fileno(), "backlog": self._backlog[k],
                 "pos": self._groups[self._group_of[k]].members.index(k), "parked": k in self._parked,
                 **({"file": list(self._files[k])} if k in self._files else {}),
                 **({"owner": list(self._pool.owner[k])} if k in self._pool.owner else {})}
                for k, s in self._socks.items()]

    def adopt(self, entries: list[dict[str, Any]]) -> None:
        """Take over the sockets an old master exported, in their groups' order."""
        # An entry without "pos" comes from a master that did not track order.
        for e in sorted(entries, key=lambda e: int(e.get("pos", 0))):
            key = _tuple(e["key"])
            sock = socket.socket(fileno=int(e["fd"]))
            os.set_inheritable(sock.fileno(), False)
            self._add(key, sock, int(e["backlog"]))
            if e.get("parked"):
                self._parked.add(key)
            if e.get("file"):
                self._files[key] = (int(e["file"][0]), int(e["file"][1]))
            if e.get("owner"):
                self._pool.own(key, _tuple(e["owner"]))
        for group in self._groups.values():
            pos = {int(e.get("pos", -1)) for e in entries if _tuple(e["key"]) in group.members}
            group.known = pos == set(range(len(group.members)))

    def adopt_listening(self, cfg: Config, socks: dict[SocketKey, socket.socket],
                        own: Iterable[SocketKey] = ()) -> None:
        """Take listening sockets passed to the master or taken from orphans, before binding the rest.

        Their group's order in the kernel is known only when a group is one
        socket; otherwise any old steering program is detached (new
        connections then reach every socket, all of which are served) and the
        group is left unsteered.
        """
        backlog = {key_for(s, 0)[:3]: s.backlog for s in cfg.listeners}
        for key, sock in socks.items():
            os.set_inheritable(sock.fileno(), False)
            if is_udp(key):
                sock.setsockopt(socket.SOL_SOCKET, udp.SO_RXQ_OVFL, 1)
            else:
                sock.listen(backlog[key[:3]])
            self._add(key, sock, backlog[key[:3]])
            if key in own and sock.family == socket.AF_UNIX and (ident := unixsock.file_id(key[0])):
                self._files[key] = ident  # `own` files (a dead master's) are removed at a clean stop
        for gid in {self._group_of[k] for k in socks}:
            group = self._groups[gid]
            group.known = len(group.members) == 1
            first = self._socks[group.members[0]]
            # A passed socket without SO_REUSEPORT is no port group: nothing to steer.
            group.refused = not first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
            if not group.known:
                try:
                    steering.detach(self._socks[group.members[0]])
                except OSError:
                    pass  # nothing was attached

    def fileno_of(self, key: SocketKey) -> int | None:
        """Return the fd of `key`'s socket, or None if it is not open."""
        sock = self._socks.get(self._pool.socket_of(key))
        return sock.fileno() if sock is not None else None

    def filenos(self) -> list[int]:
        """Return the fd of every open socket."""
        return [s.fileno() for s in self._socks.values()]

    def keys(self) -> set[SocketKey]:
        """Return the keys of every open socket."""
        return set(self._socks)

    def close_all(self) -> None:
        """Close every socket (only at a master's orderly exit: its socket files are removed)."""
        for sock in self._socks.values():
            sock.close()
        for key, ident in self._files.items():
            unixsock.remove(key[0], ident)
        self._files.clear()
        self._socks.clear()
        self._backlog.clear()
        self._group_of.clear()
        self._groups.clear()
        self._parked.clear()
        self._pool = cookiepool.Pool()
        self._membership += 1


def _tuple(k: list[Any]) -> SocketKey:
    return (str(k[0]), int(k[1]), str(k[2]), int(k[3]))
