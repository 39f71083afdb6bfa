"""Socket activation of the master: adopt the listening sockets its service manager passes.

When systemd (a socket unit, or the fd store after a restart) or
`systemd-socket-activate` starts the master, it passes sockets as fds 3, 4, ...
with `LISTEN_FDS`, `LISTEN_PID` (which must be our pid) and `LISTEN_FDNAMES`.
The master adopts each one whose name is a listener's name instead of binding,
so the accept queue that held connections while no master ran is the one the
first generation accepts from.

Names: `NAME` is the socket of listener NAME (slot 0 in reuseport mode, the
socket in shared mode); `NAME/SLOT` is slot SLOT of a reuseport listener (the
fd store names them so, see fdstore.py). In reuseport mode the master binds the
slots nobody passed next to the passed one, so the passed socket needs
SO_REUSEPORT (`ReusePort=yes` in the socket unit) when `workers.count` > 1.

Checks: each socket must be a listening TCP socket (a UDP socket for a
`protocol: udp` listener) of the listener's family, bound to its host and port; a mismatch is an error naming the fd and the
listener, and the master does not start. A socket no listener wants is
closed with a warning. The variables are removed from the environment, so
neither a USR2 re-exec (same pid) nor a worker mistakes the fds for its own.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import MutableMapping

from upgraderd.config.schema import Config, ListenerSpec
from upgraderd.contract import env as contract
from upgraderd.core.seams import SocketKey, key_for
from upgraderd.errors import FatalError
from upgraderd.system import udp, unixsock
from upgraderd.system.procfs import small_int

log = logging.getLogger("upgraderd")

SD_LISTEN_FDS_START = contract.LISTEN_FDS_START
# How an adopted socket's origin starts when its service manager passed it.
PASSED = "passed fd"
MAX_FDS = 4096


@dataclass
class Passed:
    """One socket passed to the master, and the name it came with."""

    fd: int
    name: str
    sock: socket.socket


@dataclass
class Adopted:
    """Sockets the master takes instead of binding: key -> (socket, where it came from)."""

    sockets: dict[SocketKey, tuple[socket.socket, str]] = field(default_factory=dict)

    def has(self, key: SocketKey) -> bool:
        """Return True if `key` is already adopted."""
        return key in self.sockets

    def close(self) -> None:
        """Close every adopted socket (start-up failed)."""
        for sock, _ in self.sockets.values():
            sock.close()
        self.sockets.clear()


def take_passed(environ: MutableMapping[str, str] | None = None) -> list[Passed]:
    """Take the sockets passed to this process by LISTEN_FDS; remove the variables."""
    env = os.environ if environ is None else environ
    raw_count, raw_pid = env.get(contract.LISTEN_FDS, ""), env.get(contract.LISTEN_PID, "")
    names = env.get(contract.LISTEN_FDNAMES, "").split(":")
    for var in contract.LISTEN_VARS:
        env.pop(var, None)
    count, pid = small_int(raw_count), small_int(raw_pid)
    if count is not None and pid != os.getpid():
        _close_not_ours(min(count, MAX_FDS), raw_pid)
        return []
    if count is None:
        return []
    if count > MAX_FDS:
        raise FatalError(f"LISTEN_FDS={count}: more than {MAX_FDS} passed sockets")
    out = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if i < len(names) and names[i] else "unknown"
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise FatalError(f"passed fd {fd} ({name!r}) is not a socket")
            os.set_inheritable(fd, False)
            out.append(Passed(fd, name, socket.socket(fileno=fd)))
        except OSError as e:
            raise FatalError(f"passed fd {fd} ({name!r}): {e.strerror}") from None
    return out


def _close_not_ours(count: int, raw_pid: str) -> None:
    """Close the listening sockets at the fds LISTEN_FDS names for another process.

    They were passed to some other pid (a wrapper that did not exec, or a
    LISTEN_PID left over): not ours to serve. Kept open, a SO_REUSEPORT one
    stays in its port group and the kernel queues a share of the new
    connections on it that nobody accepts. Fds that are not listening
    sockets are left alone: they may be anything.
    """
    closed = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with socket.socket(fileno=os.dup(fd)) as probe:
                listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if listening:
                os.close(fd)
                closed.append(fd)
        except OSError:
            continue
    if closed:
        log.warning("LISTEN_PID=%.20s is not this process (pid %d): closed the listening socket(s) passed "
                    "for it at fd %s", raw_pid, os.getpid(), ", ".join(map(str, closed)))


def parse_name(name: str) -> tuple[str, int | None]:
    """Return (listener name, slot or None) of a passed socket's name."""
    base, sep, slot = name.rpartition("/")
    number = small_int(slot, 4)
    if sep and number is not None and base:
        return base, number
    return name, None


def check(sock: socket.socket, spec: ListenerSpec, what: str) -> None:
    """Raise FatalError unless `sock` is a listening TCP socket (UDP for a `protocol: udp`
    listener) at `spec`'s address, or a Unix one at its path."""
    if spec.path is not None:
        problem = unixsock.check_passed(sock, spec)
    else:
        problem = udp.mismatch(sock, spec)
    if problem is None and spec.path is None:
        host, port = sock.getsockname()[:2]
        if ipaddress.ip_address(host) != ipaddress.ip_address(spec.host) or port != spec.port:
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            problem = f"is bound to {shown}"
    if problem is not None:
        raise FatalError(f"{what} {problem}, but listener {spec.name!r} is {spec.address} "
                         f"(mode {spec.mode})")


def key_of(spec: ListenerSpec, slot: int | None, cfg: Config) -> SocketKey | None:
    """Return the socket key a passed socket of `spec` serves, or None if nothing needs it."""
    if spec.mode == "worker-bind" or spec.flows == "cookie":
        return None  # a cookie listener's sockets belong to one generation: bound anew
    slot = slot or 0
    if spec.mode == "shared" and slot != 0:
        return None
    if spec.mode == "reuseport" and slot >= cfg.workers.count:
        return None
    return key_for(spec, slot)


def match(cfg: Config, passed: list[Passed], into: Adopted) -> None:
    """Adopt every passed socket a listener of `cfg` wants; close the others with a warning."""
    by_name = {s.name: s for s in cfg.listeners}
    for p in passed:
        base, slot = parse_name(p.name)
        spec = by_name.get(base)
        what = f"passed fd {p.fd} ({p.name!r})"
        key = key_of(spec, slot, cfg) if spec is not None else None
        if spec is None or key is None:
            why = "no listener has that name" if spec is None else f"listener {base!r} does not use it"
            log.warning("%s: %s; closed", what, why)
            p.sock.close()
            continue
        check(p.sock, spec, what)
        if spec.mode == "reuseport" and cfg.workers.count > 1 and \
                not p.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
            raise FatalError(f"{what} has no SO_REUSEPORT, so listener {spec.name!r} (mode reuseport, "
                             f"{cfg.workers.count} slots) cannot bind its other slots next to it: set "
                             "ReusePort=yes in the socket unit, or use mode: shared")
        if into.has(key):
            # The same socket can come twice (a socket unit and the fd store): keep one.
            log.info("%s: slot %d of %r is already passed; closed the extra copy", what, key[3], base)
            p.sock.close()
            continue
        into.sockets[key] = (p.sock, f"{PASSED} {p.fd}")
        log.info("adopted %s for listener %r slot %d (%s)", what, base, key[3], spec.address)
