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
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Iterable

from upgraderd.config.schema import Config, ListenerSpec
from upgraderd.core.seams import SocketKey, key_for
from upgraderd.system import kernel

log = logging.getLogger("upgraderd")


def migrate_req() -> int | None:
    """Return net.ipv4.tcp_migrate_req of this network namespace (None if the kernel lacks it)."""
    return kernel.read_int(kernel.MIGRATE_REQ)


def retire_risk() -> str | None:
    """Return a warning if closing a reuseport slot socket now can reset queued connections."""
    if migrate_req() == 1:
        return None
    return ("net.ipv4.tcp_migrate_req is not 1, so connections still queued on a closing "
            "SO_REUSEPORT slot socket are reset; " + kernel.FIX)


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


class ListenerSet:
    """The master's sockets, by key. Only the master calls its methods."""

    def __init__(self) -> None:
        self._socks: dict[SocketKey, socket.socket] = {}
        self._backlog: dict[SocketKey, int] = {}

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
                if spec.mode == "worker-bind":
                    continue
                for slot in sorted({key_for(spec, s)[3] for s in wanted}):
                    key = key_for(spec, slot)
                    if key in self._socks:
                        self._relisten(key, spec.backlog)
                        continue
                    self._socks[key] = bind(spec)
                    self._backlog[key] = spec.backlog
                    opened.append(key)
        except OSError as e:
            for key in opened:
                self._close(key)
            raise OSError(e.errno, f"cannot listen on {spec.address}: {e.strerror}") from None
        return opened

    def _relisten(self, key: SocketKey, backlog: int) -> None:
        if self._backlog.get(key) != backlog:
            self._socks[key].listen(backlog)
            self._backlog[key] = backlog

    def child_fds(self, cfg: Config, slot: int) -> tuple[int, ...]:
        """Return the fds worker `slot` of a `cfg` generation inherits, in `cfg.fd_listeners` order."""
        return tuple(self._socks[key_for(spec, slot)].fileno() for spec in cfg.fd_listeners)

    def keep_only(self, wanted: set[SocketKey]) -> list[SocketKey]:
        """Close every socket whose key is not in `wanted`; return the closed keys."""
        gone = [k for k in self._socks if k not in wanted]
        for key in gone:
            self._close(key)
        return gone

    def _close(self, key: SocketKey) -> None:
        sock = self._socks.pop(key, None)
        self._backlog.pop(key, None)
        if sock is not None:
            sock.close()

    def export(self) -> list[dict[str, Any]]:
        """Return every socket as {key, fd, backlog}, for a master re-exec."""
        return [{"key": list(k), "fd": s.fileno(), "backlog": self._backlog[k]}
                for k, s in self._socks.items()]

    def adopt(self, entries: list[dict[str, Any]]) -> None:
        """Take over the sockets an old master exported."""
        for e in entries:
            k = e["key"]
            key: SocketKey = (str(k[0]), int(k[1]), str(k[2]), int(k[3]))
            sock = socket.socket(fileno=int(e["fd"]))
            os.set_inheritable(sock.fileno(), False)
            self._socks[key] = sock
            self._backlog[key] = int(e["backlog"])

    def filenos(self) -> list[int]:
        """Return the fd of every open socket."""
        return [s.fileno() for s in self._socks.values()]

    def keys(self) -> set[SocketKey]:
        """Return the keys of every open socket."""
        return set(self._socks)

    def close_all(self) -> None:
        """Close every socket (only at master exit)."""
        for key in list(self._socks):
            self._close(key)
