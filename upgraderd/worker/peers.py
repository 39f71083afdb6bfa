"""Who is on the other end of a hand-off channel: names, credentials, /proc lookups.

A hand-off channel is a SOCK_SEQPACKET Unix socket bound at
`DIR/handoff-<generation>-<slot>`, where DIR is the master's channel
directory (UPGRADERD_HANDOFF_DIR, made by system/channeldir.py: a fresh
random name, mode 0700, owned by the workers' user). Other users can neither
bind a name there (no write permission on DIR) nor connect to one (no search
permission), so a local user cannot squat the next generation's channels or
flood them with connects. The names used to be abstract
(`@upgraderd-<master>-handoff-<gen>-<slot>`): global to the network
namespace, predictable and open to every user. They are still read when no
channel directory is known (a worker started by another master, or the
library used on its own), nowhere else.

Neither side trusts a name anyway: each reads its peer's credentials from the
kernel (SO_PEERCRED) and checks that the peer runs as the same uid, is a
child of the same master (its parent in /proc/PID/stat), and belongs to the
right generation (UPGRADERD_GENERATION in /proc/PID/environ, which the kernel
lets only the same uid read). Every /proc read is bounded and every parse
error means "not trusted", never an exception.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from upgraderd.contract import env as contract
from upgraderd.contract.wire import Channel, parse_name

_UCRED = struct.Struct("3i")
_ENVIRON_LIMIT = 1 << 20


def channel_dir() -> str | None:
    """Return the master's channel directory (UPGRADERD_HANDOFF_DIR), or None if it gave none."""
    value = os.environ.get(contract.HANDOFF_DIR, "")
    return value if value.startswith("/") else None


def listening_channels(master: int, net_unix: str = "/proc/net/unix", directory: str | None = None
                       ) -> list[Channel]:
    """Return the hand-off channels of `master` that some process listens on now (see
    contract/wire.py `parse_name`; `directory` defaults to ours, from the environment)."""
    directory = channel_dir() if directory is None else directory
    found: dict[str, Channel] = {}
    try:
        with open(net_unix, encoding="utf-8", errors="replace") as f:
            next(f, None)  # header line
            for line in f:
                fields = line.split()
                # Num RefCount Protocol Flags Type St Inode [Path]; a listener has
                # __SO_ACCEPTCON (0x10000) in Flags.
                if len(fields) < 8 or not fields[7].startswith(("@", "/")):
                    continue
                try:
                    listening = int(fields[3], 16) & 0x10000
                except ValueError:
                    continue
                name = fields[7][1:] if fields[7].startswith("@") else fields[7]
                chan = parse_name(name, master, directory)
                if listening and chan is not None:
                    found[chan.name] = chan
    except OSError:
        return []
    return sorted(found.values(), key=lambda c: (c.generation, c.slot))


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a Unix socket, as the kernel reports it."""

    pid: int
    uid: int
    parent: int | None
    generation: int | None


def peer_of(sock: socket.socket) -> Peer:
    """Return the credentials and upgraderd identity of `sock`'s peer."""
    pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(pid, uid, parent_of(pid), generation_of(pid))


def parent_of(pid: int) -> int | None:
    """Return the parent pid of `pid`, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096)
        # The command name may hold spaces and parentheses: parse after the last ')'.
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def generation_of(pid: int) -> int | None:
    """Return UPGRADERD_GENERATION from the environment `pid` was exec'd with, or None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read(_ENVIRON_LIMIT)
    except OSError:
        return None
    for entry in env.split(b"\0"):
        if entry.startswith(contract.GENERATION.encode() + b"="):
            return contract.small_number(entry.split(b"=", 1)[1].decode("ascii", "replace"))
    return None


def is_master(peer: Peer, master: int) -> bool:
    """Return True if `peer` is `master` and `master` is still our parent.

    The master gives connections it accepted from a slot that lost its worker
    (docs/workers.md, "The master as a giver"). It may run as another user
    (root, with workers as `workers.user`) and has no generation of its own;
    being our parent right now is its proof: a master that died has been
    replaced as our parent, so its pid, even reused, is not trusted.
    """
    return peer.pid > 0 and peer.pid == master == os.getppid()


def child_of(peer: Peer, master: int, generation: int) -> bool:
    """Return True if `peer` is a worker of `master`'s `generation` (the master's check on a taker).

    No uid check: the master's workers may run as `workers.user`.
    """
    return peer.pid > 0 and peer.pid != master and peer.parent == master and peer.generation == generation


def trusted(peer: Peer, master: int, max_generation: int, min_generation: int = 0) -> bool:
    """Return True if `peer` is a worker of `master` with a generation in the given range."""
    return (peer.pid > 0 and peer.pid != os.getpid() and peer.uid == os.geteuid()
            and peer.parent == master and peer.generation is not None
            and min_generation <= peer.generation <= max_generation)
