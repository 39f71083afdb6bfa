"""The master's HTTP endpoint: /metrics, /healthz and /readyz.

It runs in daemon threads of the master (a `ThreadingHTTPServer`). That is
safe because the master never forks: workers are started with posix_spawn,
so no child can inherit a lock held by one of these threads. Request
handlers read only the registry (whose collectors read the latest published
snapshot) and a health callback; they never touch the master's state.

- /metrics: the Prometheus text format, or OpenMetrics when the scraper's
  Accept header asks for it; gzip when Accept-Encoding allows it.
- /healthz: 200 while the master loop runs (its snapshot is fresh).
- /readyz: 200 only while an ACTIVE generation exists.
"""

from __future__ import annotations

import gzip
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("upgraderd")

Health = Callable[[], tuple[bool, bool, str]]  # (alive, ready, reason)


def split_address(address: str) -> tuple[str, int]:
    """Split 'host:port' or '[v6]:port' (already validated by the config)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    return ("127.0.0.1" if host == "localhost" else host), int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    registry: CollectorRegistry
    health: Health


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._metrics()
        elif path in ("/healthz", "/readyz"):
            alive, ready, why = self.server.health()
            ok = alive if path == "/healthz" else ready
            self._send(200 if ok else 503, f"{'ok' if ok else 'not ok'}: {why}\n".encode())
        else:
            self._send(404, b"not found; try /metrics, /healthz or /readyz\n")

    def _metrics(self) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        try:
            body = encoder(self.server.registry)
        except Exception as e:  # a broken collector must not take the endpoint down
            log.exception("metrics collection failed")
            self._send(500, f"metrics collection failed: {e}\n".encode())
            return
        extra = {}
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=1)
            extra["Content-Encoding"] = "gzip"
        self._send(200, body, content_type, extra)

    def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Log requests at debug level only: a scrape a second would flood the log."""
        log.debug("metrics endpoint: %s %s", self.address_string(), format % args)


class MetricsServer:
    """An HTTP server on `address` in a background thread."""

    def __init__(self, address: str, registry: CollectorRegistry, health: Health) -> None:
        """Bind `address` now (raises OSError); serve only after `start()`."""
        host, port = split_address(address)

        class Bound(_Server):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.httpd = Bound((host, port), _Handler)
        self.httpd.registry = registry
        self.httpd.health = health
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    @property
    def address(self) -> str:
        """Return the bound host:port (IPv6 in brackets)."""
        host, port = self.httpd.socket.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread.is_alive():
            self.httpd.shutdown()
            self._thread.join(5)
        self.httpd.server_close()
