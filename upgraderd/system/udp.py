"""UDP listeners: the master's datagram sockets, and the checks that tell them from TCP ones.

A UDP listener (`protocol: udp`) is bound by the master like a TCP one, with
SO_REUSEADDR and SO_REUSEPORT, but never listen()s: a datagram socket has no
accept queue, its queue is the receive buffer. In `reuseport` mode each
worker slot has its own socket, held by the master across generations and
across USR2, so the datagrams queued on slot i when its old worker stops
reading are read by the next generation's worker of slot i: nothing is
queued on a socket that closes during a reload. In `shared` mode every
worker reads the one socket.

SO_RXQ_OVFL is set on every socket the master binds (it belongs to the
socket, so every holder sees it): the kernel then attaches its receive-buffer
drop counter (`sk_drops`, cumulative over the socket's life) to each datagram
a worker reads, which the built-in workers report (docs/metrics.md).

A worker never calls shutdown() on such a socket: the flag belongs to the
socket, not to the worker's fd, so on Linux 6.x SHUT_RD (which fails with
ENOTCONN on an unconnected UDP socket but still sets it) makes poll() report
the socket readable for every holder from then on, the master and the next
generation included, and their loops spin on EAGAIN. Closing its own fd is
all a draining worker does (tests/os/test_udp_sockets.py shows the flag).
"""

from __future__ import annotations

import socket

from upgraderd.config.schema import ListenerSpec

SO_RXQ_OVFL = 40  # asm-generic/socket.h; Python's socket module does not name it


def family_of(host: str) -> int:
    """Return the socket family of `host` (an IP literal)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind(spec: ListenerSpec, located: bool = False) -> socket.socket:
    """Bind one UDP socket for `spec` with SO_REUSEADDR, SO_REUSEPORT and SO_RXQ_OVFL.

    With `located`, an OSError names the address.
    """
    family = family_of(spec.host)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((spec.host, spec.port))
    except OSError as e:
        sock.close()
        if located:
            raise OSError(e.errno, f"cannot bind {spec.address} (udp): {e.strerror}") from None
        raise
    return sock


def is_datagram(sock: socket.socket) -> bool:
    """Return True if `sock` is a datagram socket (what SO_TYPE says, not Python's cached type)."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_DGRAM


def mismatch(sock: socket.socket, spec: ListenerSpec) -> str | None:
    """Say why `sock` cannot serve `spec` as far as its type goes (TCP or UDP); None if it can."""
    want_udp = spec.protocol == "udp"
    kind = "UDP" if want_udp else "TCP"
    version = 6 if family_of(spec.host) == socket.AF_INET6 else 4
    if sock.family != family_of(spec.host) or is_datagram(sock) != want_udp or \
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        return f"is not a {kind}/IPv{version} socket"
    if not want_udp and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "is not listening"
    return None
