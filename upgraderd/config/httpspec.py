"""The `http:` section: how upgraderd's own HTTP server serves an `asgi:` or `wsgi:` app.

Declared here, apart from schema.py, because only `workers.app: asgi:...` and
`wsgi:...` read it. The worker gets it as one JSON variable (`ENV`, built by
`environment()`) and parses it back in upgraderd/apps/asgi/settings.py: the
names of the fields are the contract between the two.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from upgraderd.contract import env as contract
from upgraderd.config.validators import Invalid, opt, integer, duration, one_of, string, _show
from upgraderd.config.appspec import boolean

ENV = contract.HTTP


def networks(v: Any) -> tuple[str, ...]:
    """list of IP addresses or networks (CIDR)"""
    if not isinstance(v, list):
        raise Invalid(f"expected a list of addresses or networks, got {_show(v)}")
    out = []
    for item in v:
        try:
            out.append(str(ipaddress.ip_network(string(item), strict=False)))
        except ValueError:
            raise Invalid(f"{_show(item)} is not an IP address or network (e.g. 10.0.0.0/8)") from None
    return tuple(out)


def root_path(v: Any) -> str:
    """path prefix, empty or starting with / and not ending with /"""
    s = string(v) if v != "" else ""
    if s and (not s.startswith("/") or s.endswith("/")):
        raise Invalid(f"{_show(v)}: a root path starts with / and does not end with / (e.g. /api)")
    return s


@dataclass(frozen=True, kw_only=True)
class HttpSpec:
    """upgraderd's HTTP/1.1 and WebSocket server, for `workers.app: asgi:...` or `wsgi:...`."""

    max_header_bytes: int = opt(65536, integer(1024, 1 << 24), "A request head larger than this gets 431.")
    max_body_bytes: int = opt(16 << 20, integer(0, 1 << 40), "A request body larger than this gets 413.")
    header_timeout: float = opt(10.0, duration, "A client that has not sent a whole request head by "
                                "then (slowloris) gets 408 and is closed.")
    request_timeout: float = opt(60.0, duration, "An app that has not finished its response by then: "
                                 "500 if nothing was sent yet, and the connection is closed.")
    keepalive_timeout: float = opt(75.0, duration, "An idle keep-alive connection is closed after this long.")
    root_path: str = opt("", root_path, "The ASGI root_path (a prefix a proxy strips), e.g. /api.")
    trusted_proxies: tuple[str, ...] = opt((), networks, "Peers whose X-Forwarded-For and X-Forwarded-Proto "
                                           "headers are believed (addresses or networks); none by default.")
    access_log: bool = opt(True, boolean, "One line per request on the worker's stderr, in the daemon's format.")
    lifespan: str = opt("auto", one_of("auto", "on", "off"),
                        "ASGI lifespan: on (startup must succeed), auto (if the app supports it), off.")
    wsgi_threads: int = opt(8, integer(1, 1024), "Threads per worker that run a `wsgi:` app.")
    websocket_max_message: int = opt(16 << 20, integer(1024, 1 << 30),
                                     "A WebSocket message larger than this closes the connection (1009).")
    busy_limit: int = opt(8, integer(0, 1 << 16), "On a `shared` listener, a worker stops accepting while this "
                          "many requests are starting or in progress (for at most a second each), so the next "
                          "connection goes to a less busy worker; 0: accept whenever the queue has one.")


def environment(spec: HttpSpec, drain_timeout: float = 0.0, shared: tuple[str, ...] = ()) -> dict[str, str]:
    """Return the worker's variable that carries `spec`, drain.timeout (when a response still
    in progress must end) and the names of the `shared` listeners (where `busy_limit` applies:
    apps/asgi/server.py)."""
    return {ENV: json.dumps({**dataclasses.asdict(spec), "drain_timeout": drain_timeout, "shared": shared},
                            separators=(",", ":"))}
