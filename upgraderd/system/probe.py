"""HTTP readiness probes (`ready.mode: http`), run inside the master's loop without blocking.

Each starting worker gets one probe: a GET on its own health URL, retried
every `interval` until it answers 2xx. The worker is then ready. The master
stops probing a worker once it is no longer starting (it exited, or its
generation failed). The generation's `ready.timeout` bounds the whole wait;
a probe has no deadline of its own beyond one attempt.

Design note: the master's loop may block only in `select`. So probes use
non-blocking sockets registered in a private epoll object, and the master
selects on that epoll's own fd (an epoll fd is readable while any of its
sockets has an event). The master registers one fd, once, and probe
sockets come and go without touching its selector. No thread and no DNS
lookup is involved: the URL's host must be an IP address (config.py checks
it).

Only the status line is read. Anything but `HTTP/1.x 2xx` (a refusal, a
reset, a 503, no answer within `attempt_timeout`) is a failed attempt whose
reason is kept, so a generation that never became ready can say why.
"""

from __future__ import annotations

import errno
import os
import random
import re
import select
import socket
from dataclasses import dataclass, field

from upgraderd.config.validators import parse_url

INTERVAL = 0.1
ATTEMPT_TIMEOUT = 2.0
MAX_STATUS_LINE = 4096


def reserve_port(host: str = "127.0.0.1", tries: int = 64) -> int:
    """Return a port on `host` that is free now, for one worker's health endpoint.

    It is picked just below the kernel's ephemeral range: ports in that range
    are handed out as the source port of outgoing connections, and a worker
    could then fail to bind its port while a client connection happens to use
    it. Raise OSError if no free port is found.
    """
    lo = _ephemeral_low()
    first = max(1024, lo - 8192)
    for _ in range(tries):
        port = random.randrange(first, lo)
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    raise OSError(errno.EADDRINUSE, f"no free port in {first}..{lo - 1} on {host} for a probe")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return max(2048, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return 32768


@dataclass
class _Probe:
    """The probe of one worker: waiting to retry, or one attempt in flight."""

    pid: int
    url: str
    host: str
    port: int
    request: bytes
    due: float
    sock: socket.socket | None = None
    phase: str = "wait"
    buf: bytearray = field(default_factory=bytearray)
    last_error: str = "not tried yet"


class Prober:
    """Every in-flight readiness probe of the master, by worker pid."""

    def __init__(self, interval: float = INTERVAL, attempt_timeout: float = ATTEMPT_TIMEOUT) -> None:
        self.interval = interval
        self.attempt_timeout = attempt_timeout
        self._epoll = select.epoll()
        self._probes: dict[int, _Probe] = {}

    def fileno(self) -> int:
        """Return the fd the master selects on (readable when a probe socket has an event)."""
        return self._epoll.fileno()

    def add(self, pid: int, url: str, now: float) -> None:
        """Start probing worker `pid` at `url` (placeholders already expanded)."""
        host, port, path = parse_url(url)
        hosthdr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        request = (f"GET {path} HTTP/1.1\r\nHost: {hosthdr}\r\nUser-Agent: upgraderd-probe\r\n"
                   f"Connection: close\r\n\r\n").encode()
        self.remove(pid)
        self._probes[pid] = _Probe(pid, url, host, port, request, due=now)

    def pids(self) -> set[int]:
        """Return the pids being probed."""
        return set(self._probes)

    def remove(self, pid: int) -> tuple[str, str] | None:
        """Stop probing `pid`; return its (url, last error), or None if it was not probed."""
        p = self._probes.pop(pid, None)
        if p is None:
            return None
        self._close(p)
        return p.url, p.last_error

    def next_deadline(self) -> float | None:
        """Return when `poll` next has something to do without an fd event, or None."""
        return min((p.due for p in self._probes.values()), default=None)

    def poll(self, now: float) -> list[int]:
        """Advance every probe without blocking; return the pids that just answered 2xx."""
        events = dict(self._epoll.poll(0))
        ready = []
        for p in list(self._probes.values()):
            if self._advance(p, events.get(p.sock.fileno(), 0) if p.sock else 0, now):
                ready.append(p.pid)
                self.remove(p.pid)
        return ready

    def close(self) -> None:
        """Stop every probe and close the epoll object."""
        for pid in list(self._probes):
            self.remove(pid)
        self._epoll.close()

    # -- one probe --

    def _advance(self, p: _Probe, ev: int, now: float) -> bool:
        try:
            if p.phase == "wait":
                if now >= p.due:
                    self._connect(p, now)
                return False
            if p.phase == "connect" and ev:
                self._connected(p)
            elif p.phase == "read" and ev:
                if self._read(p):
                    return True
            if p.sock is not None and now >= p.due:
                raise _Failed(f"no answer within {self.attempt_timeout:g}s")
        except _Failed as e:
            self._retry(p, str(e), now)
        except OSError as e:
            self._retry(p, e.strerror or str(e), now)
        return False

    def _connect(self, p: _Probe, now: float) -> None:
        family = socket.AF_INET6 if ":" in p.host else socket.AF_INET
        p.sock = socket.socket(family, socket.SOCK_STREAM)
        p.sock.setblocking(False)
        p.phase, p.due, p.buf = "connect", now + self.attempt_timeout, bytearray()
        rc = p.sock.connect_ex((p.host, p.port))
        if rc not in (0, errno.EINPROGRESS):
            raise _Failed(os.strerror(rc))
        self._epoll.register(p.sock.fileno(), select.EPOLLOUT)

    def _connected(self, p: _Probe) -> None:
        assert p.sock is not None
        err = p.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise _Failed(os.strerror(err))
        # A request this small always fits an empty send buffer.
        p.sock.send(p.request)
        p.phase = "read"
        self._epoll.modify(p.sock.fileno(), select.EPOLLIN)

    def _read(self, p: _Probe) -> bool:
        assert p.sock is not None
        try:
            chunk = p.sock.recv(MAX_STATUS_LINE)
        except BlockingIOError:
            return False
        if not chunk and b"\r\n" not in p.buf:
            raise _Failed("the connection closed before a status line")
        p.buf += chunk
        line, sep, _ = bytes(p.buf).partition(b"\r\n")
        if not sep:
            if len(p.buf) >= MAX_STATUS_LINE:
                raise _Failed("no HTTP status line")
            return False
        m = re.fullmatch(rb"HTTP/1\.[01] (\d{3})(?: .*)?", line)
        if not m:
            raise _Failed(f"not an HTTP answer: {line[:60]!r}")
        if not 200 <= int(m.group(1)) <= 299:
            raise _Failed(f"answered {line[:60].decode(errors='replace')}")
        return True

    def _retry(self, p: _Probe, why: str, now: float) -> None:
        self._close(p)
        p.phase, p.due, p.last_error = "wait", now + self.interval, why

    def _close(self, p: _Probe) -> None:
        if p.sock is None:
            return
        try:
            self._epoll.unregister(p.sock.fileno())
        except (KeyError, FileNotFoundError, ValueError):
            pass
        p.sock.close()
        p.sock = None


class _Failed(Exception):
    """One probe attempt failed; the message says why."""
