"""One master per address: refuse to start next to another live master.

SO_REUSEPORT lets a second master of the same user join a port group
silently, and the kernel then splits new connections between two configs.
The master checks before it binds:

1. the LISTEN sockets on each of its addresses, by socket inode, from the
   kernel's socket table of this network namespace: through NETLINK_SOCK_DIAG
   (the LISTEN state only), else /proc/net/tcp and /proc/net/tcp6. Those files
   list every TIME_WAIT entry too: 68,000 lines took 0.8-1.7 s to read on a
   busy test machine, where the netlink dump takes milliseconds;
2. who holds an fd of each such inode, from /proc/*/fd;
3. whether a holder is a live upgraderd master, or a worker (it has our
   UPGRADERD_* variables) whose parent is one.

What must not block, and does not:
- this very process (a USR2 re-exec keeps its pid; socket activation hands
  the master its own sockets) and its own children;
- the orphans of a dead master: their parent is gone (init or a subreaper
  adopted them), so they are taken over instead (system/orphanfds.py);
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
import struct
from dataclasses import dataclass

from upgraderd.config.schema import Config
from upgraderd.contract import env as contract
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


def listening(protocol: str = "tcp") -> list[tuple[IPAddress, int, int]]:
    """Return (address, port, inode) of every TCP LISTEN (or bound unconnected UDP) socket here."""
    udp = protocol == "udp"
    try:
        return [s for family in (socket.AF_INET, socket.AF_INET6) for s in _diag_listening(family, udp)]
    except OSError:
        return _proc_listening(("/proc/net/udp", "/proc/net/udp6") if udp else ("/proc/net/tcp", "/proc/net/tcp6"),
                               UNCONNECTED if udp else LISTEN)


_NLMSG = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI48s")
_MSG = struct.Struct("=BBBBHH16s16sIQIIIII")
SOCK_DIAG_BY_FAMILY, NLMSG_ERROR, NLMSG_DONE = 20, 2, 3
TCP_LISTEN = 10
TCP_CLOSE = 7  # the state of a bound, unconnected UDP socket
UNCONNECTED = "07"


def _diag_listening(family: int, udp: bool = False) -> list[tuple[IPAddress, int, int]]:
    """Ask the kernel (NETLINK_SOCK_DIAG) for the TCP LISTEN (or unconnected UDP) sockets of `family`."""
    want = TCP_CLOSE if udp else TCP_LISTEN
    req = _REQ.pack(family, socket.IPPROTO_UDP if udp else socket.IPPROTO_TCP, 0, 0, 1 << want, b"")
    out: list[tuple[IPAddress, int, int]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 4) as nl:
        nl.settimeout(2.0)
        nl.send(_NLMSG.pack(_NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, 0x301, 1, 0) + req)
        while True:
            data, off = nl.recv(1 << 16), 0
            while off + _NLMSG.size <= len(data):
                length, kind = _NLMSG.unpack_from(data, off)[:2]
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR or length < _NLMSG.size:
                    raise OSError("sock_diag refused the request")
                fam, state, _t, _r, sport, _d, src, _dst, _if, _c, _e, _rq, _wq, _uid, inode = \
                    _MSG.unpack_from(data, off + _NLMSG.size)
                addr = ipaddress.ip_address(src[:4] if fam == socket.AF_INET else src)
                if state == want and inode:
                    out.append((addr, socket.ntohs(sport), inode))
                off += (length + 3) & ~3


def _proc_listening(table_paths: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6"), state: str = LISTEN
                    ) -> list[tuple[IPAddress, int, int]]:
    """Read LISTEN sockets from /proc/net/tcp{,6}: slow with many TIME_WAIT entries, a fallback."""
    out = []
    for path in table_paths:
        raw = procfs.read_bounded(path, 64 << 20)
        for line in (raw or b"").decode("ascii", "replace").splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10 or fields[3] != state or not fields[9].isdigit():
                continue
            where = _decode(fields[1])
            if where is not None and int(fields[9]) > 0:
                out.append((where[0], where[1], int(fields[9])))
    return out


def unverified(gid: tuple[int, str, int, int], members: int) -> str | None:
    """Return why the kernel's group at `gid` is not the `members` sockets we know of, or None.

    The kernel's LISTEN sockets on exactly this TCP address (sock_diag) are
    the group; a count that differs means a stranger joined it (strangers.py finds who),
    and the positions a program would name are a guess. UDP groups are not
    checked here.
    """
    family, host, port, kind = gid
    if kind != socket.SOCK_STREAM or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        found = sum(1 for addr, p, _ in listening("tcp") if p == port and str(addr) == host)
    except (OSError, ValueError):
        return None
    if found == members:
        return None
    return f"{found} sockets listen in the group and this master holds {members} (a stranger joined it)"


def _overlaps(a: IPAddress, b: IPAddress) -> bool:
    if a.version != b.version:
        return False
    return a == b or a.is_unspecified or b.is_unspecified


def find_conflict(cfg: Config, me: int | None = None) -> Conflict | None:
    """Return the first other live master serving one of `cfg`'s addresses, or None."""
    me = os.getpid() if me is None else me
    # Unix socket listeners are not looked up here: bind() probes their file (unixsock.py).
    by_inode: dict[int, str] = {}
    for protocol in sorted({s.protocol for s in cfg.listeners}):
        wanted = [(ipaddress.ip_address(s.host), s.port, s.address + ("/udp" if protocol == "udp" else ""))
                  for s in cfg.listeners if s.protocol == protocol and s.path is None]
        for addr, port, inode in listening(protocol):
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
    if contract.GENERATION in env and procfs.is_master(parent):
        return parent
    return None


def family_of(host: str) -> int:
    """Return the socket family of `host`."""
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
