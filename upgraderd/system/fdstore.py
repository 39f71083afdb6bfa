"""The fd store: keep the listening sockets with the service manager, for a restarted master.

When the master runs under a service manager (`NOTIFY_SOCKET` is set), it
sends each listening socket there with `FDSTORE=1` and `FDNAME=<name>` (the
datagram carries the fd as SCM_RIGHTS, as sd_pid_notify_with_fds(3) does). A
master that crashes or is restarted gets them back as LISTEN_FDS, with their
names in LISTEN_FDNAMES (activation.py adopts them), and their accept queues
never closed: connections wait instead of being refused.

Names: a listener's socket is `NAME`; in reuseport mode slot i > 0 is
`NAME/i`. A socket the master closes is removed with `FDSTOREREMOVE=1`.

systemd needs `FileDescriptorStoreMax=` > 0 in the service (it ignores the
fds otherwise) and keeps the store across a restart of the service
(`FileDescriptorStorePreserve=`, systemd 254+, or any automatic restart); it
drops duplicates of an fd it already holds, so sending one again is harmless.
"""

from __future__ import annotations

import logging
import socket
from typing import Callable, Mapping

from upgraderd.config.schema import Config
from upgraderd.contract import env as contract
from upgraderd.core.seams import SocketKey, key_for

log = logging.getLogger("upgraderd")


def names(cfg: Config, keys: set[SocketKey]) -> dict[SocketKey, str]:
    """Return the fd-store name of each of `keys` that `cfg` has a listener for."""
    by_addr = {key_for(s, 0)[:3]: s.name for s in cfg.listeners}
    out = {}
    for key in keys:
        name = by_addr.get(key[:3])
        if name is not None:
            out[key] = name if key[3] == 0 else f"{name}/{key[3]}"
    return out


class FdStore:
    """What this master has stored with its service manager, by socket key."""

    def __init__(self, address: str) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.stored: dict[SocketKey, str] = {}
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FdStore | None:
        """Return the store of $NOTIFY_SOCKET, or None when no service manager listens."""
        address = environ.get(contract.NOTIFY_SOCKET, "")
        return cls(address) if address else None

    def sync(self, wanted: dict[SocketKey, str], fileno_of: Callable[[SocketKey], int | None]) -> None:
        """Store every socket of `wanted` not stored yet; remove the stored ones now closed."""
        for key, name in sorted(wanted.items()):
            fd = fileno_of(key)
            if self.stored.get(key) != name and fd is not None and \
                    self._send(f"FDSTORE=1\nFDNAME={name}", [fd]):
                self.stored[key] = name
        for key in [k for k in self.stored if fileno_of(k) is None]:
            if self._send(f"FDSTOREREMOVE=1\nFDNAME={self.stored[key]}", []):
                del self.stored[key]

    def _send(self, message: str, fds: list[int]) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                socket.send_fds(s, [message.encode()], fds)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot store listening sockets with the service manager (%s): a restarted "
                            "master will bind anew", e.strerror or e)
            return False
        return True
