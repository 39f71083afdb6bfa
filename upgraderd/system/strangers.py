"""Listeners on the master's TCP addresses that are not the master's: a port group shared with a stranger.

SO_REUSEPORT lets any process of the same effective uid join the master's
port group (and a listener on a more specific address of the same port takes
its connections outright). The kernel then queues a share of the new
connections on the stranger's socket; if it never accepts, they hang. conflict.py
refuses a second *master*; this finds any other process.

How: the kernel's LISTEN sockets on each address (sock_diag, conflict.listening)
whose inode is none of the master's sockets; then who holds them
(/proc/*/fd). Only when there is such an inode is /proc walked, so the usual
check costs one netlink dump. Not strangers:
- the master itself and its descendants (workers, templates and the workers
  they fork; a socket the master closed may live on in a draining worker);
- orphaned workers of a dead master (an UPGRADERD_GENERATION worker that no
  live master owns): they drain by themselves within their grace period.
An inode whose holder cannot be seen (another user's process, without root)
is reported with pid 0.

`conflict.unverified` is the steering's check (sockets.py): before it builds a
program for a TCP group it counts the group's sockets in the kernel, and a
group with one it did not bind is not steered (its positions are a guess).

`CheckedListeners.ensure` checks at the start and at every reload or grow:
the start is refused (exit 3) and a reload fails (`upgraderd reload` exits
1), each naming the stranger, so the operator learns of it; the serving
generation is left alone. Between reloads the master asks
`CheckedListeners.strangers` every few seconds (core/slots.py): a stranger
that joined since is reported by /readyz (503, naming it) and by the gauge
`upgraderd_reuseport_foreign_listeners` until it leaves.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from dataclasses import dataclass
from typing import Iterable

from upgraderd.config.schema import Config
from upgraderd.contract import env as contract
from upgraderd.core.seams import SocketKey
from upgraderd.system import conflict, procfs
from upgraderd.system.sockets import ListenerSet


@dataclass(frozen=True)
class Stranger:
    """A process (`pid`, 0 if unseen) listening on `address` in a group of ours."""

    pid: int
    address: str

    def message(self) -> str:
        """Return the operator's line."""
        who = f"pid {self.pid} ({_command(self.pid)})" if self.pid else "a process this master cannot see"
        return (f"{who} listens on {self.address}, which is not this master's socket: the kernel would give "
                "it a share of the new connections; stop it, or give this master another address")


def _command(pid: int) -> str:
    args = procfs.cmdline(pid)
    text = " ".join(a.decode("utf-8", "replace") for a in args[:4])
    return text[:80] or "?"


def find(cfg: Config, ours: set[int], me: int | None = None) -> list[Stranger]:
    """Return the strangers listening on `cfg`'s TCP addresses (`ours`: the inodes the master holds)."""
    me = os.getpid() if me is None else me
    wanted = [(ipaddress.ip_address(s.host), s.port, s.address) for s in cfg.listeners
              if s.protocol == "tcp" and s.path is None and s.mode != "worker-bind"]
    if not wanted:
        return []
    foreign: dict[int, str] = {}
    for addr, port, inode in conflict.listening("tcp"):
        if inode in ours:
            continue
        for host, want_port, label in wanted:
            if port == want_port and _overlaps(addr, host):
                foreign[inode] = label
    if not foreign:
        return []
    owners = procfs.socket_owners(set(foreign))
    out = [Stranger(pid, foreign[min(held)]) for pid, held in sorted(owners.items()) if not _ours(pid, me)]
    seen = set().union(*owners.values()) if owners else set()
    out += [Stranger(0, label) for inode, label in sorted(foreign.items()) if inode not in seen]
    return out


def refuse(cfg: Config, ours: set[int]) -> None:
    """Raise OSError (EADDRINUSE) naming up to three strangers on `cfg`'s TCP addresses."""
    found = find(cfg, ours)
    if found:
        raise OSError(errno.EADDRINUSE, "; ".join(f.message() for f in found[:3]))


def _overlaps(a: conflict.IPAddress, b: conflict.IPAddress) -> bool:
    return a.version == b.version and (a == b or a.is_unspecified or b.is_unspecified)


def _ours(pid: int, me: int) -> bool:
    """Return True for us, our descendants (up to a template's workers) and dead masters' orphans."""
    if pid == me:
        return True
    parent = procfs.ppid_uid_state(pid)
    grand = procfs.ppid_uid_state(parent[0]) if parent is not None and parent[0] > 1 else None
    if (parent is not None and parent[0] == me) or (grand is not None and grand[0] == me):
        return True
    env = procfs.environ(pid) or {}
    if contract.GENERATION not in env or procfs.is_master(pid):
        return False
    # A worker whose master (its parent, or its template's parent) is alive is that master's.
    return not any(p is not None and p[0] > 1 and procfs.is_master(p[0]) for p in (parent, grand))


class CheckedListeners(ListenerSet):
    """The master's ListenerSet, refusing to serve a port group a stranger shares."""

    def ensure(self, cfg: Config, count: int | None = None,
               slots: Iterable[int] | None = None) -> list[SocketKey]:
        """Bind as ListenerSet.ensure does, then raise OSError (undoing this call's binds) if a
        stranger listens on one of `cfg`'s TCP addresses."""
        opened = super().ensure(cfg, count, slots)
        try:
            refuse(cfg, self._inodes())
        except OSError:
            for key in reversed(opened):
                self._release(key)
            raise
        return opened

    def strangers(self, cfg: Config) -> list[str]:
        """Return the operator's line for each stranger listening on one of `cfg`'s TCP addresses now."""
        return [f.message() for f in find(cfg, self._inodes())]

    def _inodes(self) -> set[int]:
        return {os.fstat(fd).st_ino for fd in self.filenos()}
