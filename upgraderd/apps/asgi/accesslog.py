"""The access log of an `asgi:`/`wsgi:` worker, and the X-Forwarded-* reading it shares.

One line per request on the worker's stderr (which the master's stderr or
log file receives), in the daemon's text format: `TIME upgraderd[PID] INFO
message`, TIME in ISO 8601 with milliseconds and offset. The message names
the client, the request line, the status, the bytes of body sent and the time
taken. Off with `http.access_log: false` (it costs about a tenth of the
throughput of a hello-world app).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable


def _now() -> str:
    t = time.time()
    local = time.localtime(t)
    off = time.strftime("%z", local)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', local)}.{int(t * 1000) % 1000:03d}{off[:3]}:{off[3:]}"


def _who(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "-"


class AccessLog:
    """Writes one line per request when enabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def _write(self, level: str, message: str) -> None:
        sys.stderr.write(f"{_now()} upgraderd[{os.getpid()}] {level} {message}\n")

    def request(self, client: tuple[str, int] | None, scope: dict[str, Any], status: int, sent: int,
                seconds: float) -> None:
        """Log an answered request."""
        if not self.enabled:
            return
        target = scope["path"] + ("?" + scope["query_string"].decode("latin-1") if scope["query_string"] else "")
        self._write("INFO", f'{_who(client)} "{scope["method"]} {target} HTTP/{scope["http_version"]}" '
                            f"{status} {sent} {seconds * 1000:.1f}ms")

    def refused(self, client: tuple[str, int] | None, status: int) -> None:
        """Log a request answered by the server itself (bad input, limits, timeouts, failures)."""
        if self.enabled or status >= 500:
            self._write("WARNING" if status < 500 else "ERROR", f"{_who(client)} refused: {status}")


def forwarded(headers: list[tuple[bytes, bytes]], client: tuple[str, int],
              trusts: Callable[[str], bool]) -> tuple[tuple[str, int], str]:
    """Return (client, scheme) as a trusted proxy tells them (X-Forwarded-For, X-Forwarded-Proto).

    X-Forwarded-For is read from the right, skipping the addresses of trusted
    proxies: the first one that is not trusted is the client (the left-most
    could be anything the client sent).
    """
    scheme = "http"
    for name, value in headers:
        if name == b"x-forwarded-proto":
            proto = value.decode("latin-1").split(",")[-1].strip().lower()
            if proto in ("http", "https", "ws", "wss"):
                scheme = proto
        elif name == b"x-forwarded-for":
            hops = [h.strip() for h in value.decode("latin-1").split(",") if h.strip()]
            for hop in reversed(hops):
                client = (hop, 0)
                if not trusts(hop):
                    break
    return client, scheme
