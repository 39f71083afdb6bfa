"""One master per address: refuse to start next to another live master.

SO_REUSEPORT lets a second master of the same user join a port group
silently, and the kernel then splits new connections between two configs.
The master checks before it binds:

1. the LISTEN sockets on each of its addresses, from /proc/net/tcp and
   /proc/net/tcp6 (so: this network namespace only), by socket inode;
2. who holds an fd of each such inode, from /proc/*/fd;
3. whether a holder is a live upgraderd master, or a worker (it has our
   UPGRADERD_* variables) whose parent is one.

What must not block, and does not:
- this very process (a USR2 re-exec keeps its pid; socket activation hands
  the master its own sockets) and its own children;
- the orphans of a dead master: their parent is gone (init or a subreaper
  adopted them), so they are taken over instead (system/orphans.py);
- systemd, or any other service manager, holding a socket unit or fd store.

Limits: without root, /proc/*/fd of other users' processes cannot be read,
so only a master of the same user is seen; that is the case SO_REUSEPORT
lets through (the kernel refuses a second user's bind by itself). A master
that is starting and has bound nothing yet is not seen: two masters started
in the same instant can both pass; the pidfile lock covers one pidfile.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

from upgraderd.config.schema import Config
from upgraderd.system import procfs

LISTEN = "0A"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Conflict:
    """Another live master (`pid`) serves `address`, through process `holder`."""

    pid: int
    address: str
    holder: int

    def message(self) -> str:
        """Return the operator's error line."""
        via = "" if self.holder == self.pid else f" (through its worker pid {self.holder})"
        return (f"another upgraderd master (pid {self.pid}) already serves {self.address}{via}; "
                "stop it first, or give this one another address")


def _decode(hexaddr: str) -> tuple[IPAddress, int] | None:
    host, _, port = hexaddr.partition(":")
    try:
        raw = bytes.fromhex(host)
        # /proc/net/tcp prints each 32-bit word in host (little-endian) order.
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        return ipaddress.ip_address(raw), int(port, 16)
    except ValueError:
        return None


def listening(table_paths: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")
              ) -> list[tuple[IPAddress, int, int]]:
    """Return (address, port, inode) of every TCP LISTEN socket in this network namespace."""
    out = []
    for path in table_paths:
        raw = procfs.read_bounded(path, 64 << 20)
        for line in (raw or b"").decode("ascii", "replace").splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10 or fields[3] != LISTEN or not fields[9].isdigit():
                continue
            where = _decode(fields[1])
            if where is not None and int(fields[9]) > 0:
                out.append((where[0], where[1], int(fields[9])))
    return out


def _overlaps(a: IPAddress, b: IPAddress) -> bool:
    if a.version != b.version:
        return False
    return a == b or a.is_unspecified or b.is_unspecified


def find_conflict(cfg: Config, me: int | None = None) -> Conflict | None:
    """Return the first other live master serving one of `cfg`'s addresses, or None."""
    me = os.getpid() if me is None else me
    wanted = [(ipaddress.ip_address(s.host), s.port, s.address) for s in cfg.listeners]
    sockets = listening()
    by_inode: dict[int, str] = {}
    for addr, port, inode in sockets:
        for host, want_port, label in wanted:
            if port == want_port and _overlaps(addr, host):
                by_inode[inode] = label
    for holder, inodes in sorted(procfs.socket_owners(set(by_inode)).items()):
        master = _master_of(holder, me)
        if master is not None:
            return Conflict(master, by_inode[min(inodes)], holder)
    return None


def _master_of(pid: int, me: int) -> int | None:
    """Return the live master `pid` is or works for (not us), or None."""
    if pid == me:
        return None
    facts = procfs.ppid_uid_state(pid)
    if facts is None or facts[2] in ("Z", "X"):
        return None
    if procfs.is_master(pid):
        return pid
    parent = facts[0]
    if parent in (me, 0, 1):
        return None
    env = procfs.environ(pid) or {}
    if "UPGRADERD_GENERATION" in env and procfs.is_master(parent):
        return parent
    return None


def family_of(host: str) -> int:
    """Return the socket family of `host`."""
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
