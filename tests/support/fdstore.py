"""A stand-in for systemd's notify socket and fd store, for tests of the master's FDSTORE=1.

It receives sd_notify datagrams on a Unix socket, keeps the fds sent with
FDSTORE=1 under their FDNAME (dropping a duplicate of an fd it already holds,
and every fd of a name on FDSTOREREMOVE=1, as systemd does), and hands them back
to a restarted master the way systemd would: as LISTEN_FDS from fd 3, with
LISTEN_FDNAMES and LISTEN_PID (`wrap()`, through tests/fixtures/listen_exec.py).

Not covered by this stand-in (only real systemd has it): FileDescriptorStoreMax=,
the store's lifetime across `systemctl restart`/stop (FileDescriptorStorePreserve=),
credentials checks on the sender, and POLLHUP pruning of dead fds.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path

from tests.support import ROOT


class FdStoreStandIn:
    """A NOTIFY_SOCKET that keeps FDSTORE=1 fds."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.lock = threading.Lock()
        self.stored: list[tuple[str, int]] = []
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 64)
            except (socket.timeout, OSError):
                continue
            self._handle(msg.decode(errors="replace"), fds)

    def _handle(self, text: str, fds: list[int]) -> None:
        fields = dict(line.partition("=")[::2] for line in text.splitlines())
        with self.lock:
            self.messages.append(text)
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    st = os.fstat(fd)
                    if any((os.fstat(k).st_dev, os.fstat(k).st_ino) == (st.st_dev, st.st_ino)
                           for _, k in self.stored):
                        os.close(fd)
                    else:
                        self.stored.append((fields.get("FDNAME", "stored"), fd))
                return
            for fd in fds:
                os.close(fd)
            if fields.get("FDSTOREREMOVE") == "1":
                gone = [fd for name, fd in self.stored if name == fields.get("FDNAME")]
                self.stored = [(n, fd) for n, fd in self.stored if fd not in gone]
                for fd in gone:
                    os.close(fd)

    def names(self) -> list[str]:
        """Return the names of the stored fds, in order."""
        with self.lock:
            return [name for name, _ in self.stored]

    def wrap(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Return (command prefix, fds to pass) that start a master with the stored fds."""
        with self.lock:
            fds = tuple(fd for _, fd in self.stored)
            names = ":".join(name for name, _ in self.stored)
        prefix = (sys.executable, str(ROOT / "tests" / "fixtures" / "listen_exec.py"),
                  ",".join(map(str, fds)), names, "--")
        return prefix, fds

    def close(self) -> None:
        """Stop receiving and close every stored fd."""
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        with self.lock:
            for _, fd in self.stored:
                os.close(fd)
            self.stored.clear()


def next_state(sock: socket.socket) -> dict[str, str]:
    """Return the next state message a master sent to a stand-in NOTIFY_SOCKET; skip FDSTORE=1 ones."""
    while True:
        data, _ = sock.recvfrom(4096)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        if "FDSTORE" not in fields:
            return fields
