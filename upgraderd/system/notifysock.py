"""The master's receiving end of the sd_notify protocol.

`NotifyServer` is the master's datagram socket that workers send `READY=1`
to. SO_PASSCRED makes the kernel attach the sender's pid to every message,
so the master can ignore (and count) messages that do not come from one of
its own workers. It is bound in the abstract namespace: nothing to unlink.

The sending end, which workers, templates and the master (to systemd) use,
is `upgraderd.contract.notify.notify`, with the messages themselves.
"""

from __future__ import annotations

import os
import socket
import struct

_UCRED = struct.Struct("iII")


class NotifyServer:
    """The master's NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(f"\0upgraderd-{os.getpid()}-{os.urandom(4).hex()}")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.setblocking(False)
        self.sock = sock

    @property
    def address(self) -> str:
        """Return the NOTIFY_SOCKET value workers use ('@' marks the abstract namespace)."""
        raw = self.sock.getsockname()
        name: str = raw.decode() if isinstance(raw, bytes) else str(raw)
        return "@" + name[1:] if name.startswith("\0") else name

    def fileno(self) -> int:
        """Return the socket's fd, for select."""
        return self.sock.fileno()

    def receive(self) -> list[tuple[int, bytes]]:
        """Read every pending datagram; return (sender pid, payload) pairs."""
        out: list[tuple[int, bytes]] = []
        while True:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return out
            pid = 0
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[:_UCRED.size])[0]
            out.append((pid, data))

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

