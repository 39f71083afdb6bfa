"""UDP listeners of the built-in workers: read a datagram, answer it, never lose one at a reload.

A UDP listener's socket is one of the master's slot sockets (system/udp.py):
held by the master and shared by the old and the new generation's worker of
the same slot. The rules that make a reload lose nothing:

- every datagram a worker has read is answered before the worker reads the
  next one (the loop is single-threaded per `Server`), so "answered" and
  "read" never differ by more than the datagram in hand;
- on the drain signal the worker stops watching the socket and reads only
  what is queued on it at that moment, bounded (`DRAIN_BATCH`): those are the
  datagrams the kernel gave this slot while the worker was still its reader.
  For a slot the new generation keeps, the new worker reads alongside, so the
  queue is empty at once; for a slot that retires (fewer workers, TTOU) the
  master has already steered new datagrams away from it, and this read is
  what leaves nothing on the socket when it closes;
- the worker then closes its own fd. It never calls shutdown(): the flag
  belongs to the shared socket, and after SHUT_RD poll() reports it readable
  for every holder forever (system/udp.py).

SO_RXQ_OVFL: the master sets it on every UDP socket it binds; the worker sets
it again (adopted sockets, older masters) and reads the kernel's cumulative
drop counter from each datagram's ancillary data. It is reported per socket
(connmetrics.py, `upgraderd_udp_receive_drops`).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from typing import Any, Protocol, runtime_checkable

from upgraderd.apps.connmetrics import ConnectionMetrics

SO_RXQ_OVFL = 40
SO_MEMINFO = 55        # u32[9]; index 8 (SK_MEMINFO_DROPS) is the same counter SO_RXQ_OVFL reports
MAX_DATAGRAM = 65535
READ_BATCH = 64        # datagrams per readable event, so one busy socket cannot starve the loop
DRAIN_BATCH = 4096     # at most this many queued datagrams are answered after the drain signal
SEND_WAIT = 1.0        # how long a reply may wait for room in a full send buffer
_ANC = socket.CMSG_SPACE(4)


@runtime_checkable
class DatagramProtocol(Protocol):
    """What an app does with one datagram: return the reply, or None for no reply."""

    def datagram(self, data: bytes) -> bytes | None:
        """Answer one datagram."""


def is_udp(sock: socket.socket) -> bool:
    """Return True if `sock` is a datagram socket."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_DGRAM


class DatagramListener:
    """One UDP listener of one `Server`: its socket, the app's protocol and the counts."""

    def __init__(self, name: str, sock: socket.socket, proto: object, metrics: ConnectionMetrics) -> None:
        if not isinstance(proto, DatagramProtocol):
            raise SystemExit(f"upgraderd worker {os.getpid()}: listener {name!r} is UDP, but the app's "
                             f"protocol {type(proto).__name__} has no datagram() method")
        self.name = name
        self.sock = sock
        self.proto = proto
        self.metrics = metrics
        self.inode = str(os.fstat(sock.fileno()).st_ino)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
            # The kernel attaches the counter only once it is above 0: start from its value now.
            meminfo = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 36)
            metrics.udp_drops(name, self.inode, struct.unpack("=9I", meminfo)[8])
        except (OSError, struct.error):
            pass  # an old kernel: no drop counter, the datagrams still flow

    def readable(self, limit: int = READ_BATCH) -> bool:
        """Read and answer up to `limit` datagrams; return True once the queue is empty."""
        for _ in range(limit):
            try:
                data, anc, _flags, addr = self.sock.recvmsg(MAX_DATAGRAM, _ANC)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as e:
                if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue  # an ICMP error for an earlier reply: nothing was read
                raise
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(value) >= 4:
                    self.metrics.udp_drops(self.name, self.inode, struct.unpack("=I", value[:4])[0])
            self.metrics.datagram_in(self.name, len(data))
            reply = self.proto.datagram(data)
            if reply is not None:
                self._send(reply, addr)
        return False

    def _send(self, reply: bytes, addr: Any) -> None:
        for _ in range(2):
            try:
                self.sock.sendto(reply, addr)
            except (BlockingIOError, InterruptedError):
                select.select([], [self.sock], [], SEND_WAIT)
                continue
            except OSError:
                break  # unreachable or too big: the client sees no answer, as on any network
            self.metrics.datagram_out(self.name, len(reply))
            return
        self.metrics.datagram_unsent(self.name)

    def drain(self) -> None:
        """Answer what is queued now (bounded), then close this worker's fd of the socket."""
        self.sock.setblocking(False)
        self.readable(DRAIN_BATCH)
        self.sock.close()
