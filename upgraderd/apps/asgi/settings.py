"""The worker's view of the config's `http:` section (upgraderd/config/httpspec.py).

The master passes the section as one JSON variable; a missing or unreadable
one gives the defaults, so `python -m upgraderd.apps.asgi` also runs by hand.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, fields
from typing import Any

from upgraderd.contract import env as contract

ENV = contract.HTTP


@dataclass(frozen=True)
class Settings:
    """Limits and options of the HTTP server (the fields of config's HttpSpec)."""

    max_header_bytes: int = 65536
    max_body_bytes: int = 16 << 20
    header_timeout: float = 10.0
    request_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    root_path: str = ""
    trusted_proxies: tuple[str, ...] = ()
    access_log: bool = True
    lifespan: str = "auto"
    wsgi_threads: int = 8
    websocket_max_message: int = 16 << 20
    busy_limit: int = 8
    drain_timeout: float = 0.0   # drain.timeout (0: unknown), not an `http:` key
    shared: tuple[str, ...] = ()   # the listeners in mode `shared`, not an `http:` key

    def trusts(self, peer: str) -> bool:
        """Return True if X-Forwarded-* headers from `peer` (an IP address) are believed."""
        if not self.trusted_proxies or not peer:
            return False
        try:
            ip = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(net) for net in self.trusted_proxies)


def from_environment(environ: dict[str, str] | None = None) -> Settings:
    """Return the settings the master passed (UPGRADERD_HTTP), or the defaults."""
    raw = (os.environ if environ is None else environ).get(ENV, "")
    try:
        given = json.loads(raw) if raw else {}
    except ValueError:
        given = {}
    known = {f.name for f in fields(Settings)}
    kwargs: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items()
                              if k in known} if isinstance(given, dict) else {}
    return Settings(**kwargs)
