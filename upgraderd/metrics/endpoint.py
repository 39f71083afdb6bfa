"""The master's HTTP endpoint: /metrics, /healthz and /readyz.

It runs in daemon threads of the master (a `ThreadingHTTPServer`). That is
safe because the master never forks: workers are started with posix_spawn,
so no child can inherit a lock held by one of these threads. Request
handlers read only the registry (whose collectors read the latest published
snapshot) and a health callback; they never touch the master's state.

- /metrics: the Prometheus text format, or OpenMetrics when the scraper's
  Accept header asks for it; gzip when Accept-Encoding allows it.
- /healthz: 200 while the master loop runs (its snapshot is fresh).
- /readyz: 200 only while an ACTIVE generation exists (and no stranger shares a port group).

Any local user can connect, so the endpoint is bounded and can never starve
the master of fds, threads or CPU:
- at most `MAX_CONNECTIONS` connections are served at once (one thread
  each);
- a connection must send its whole request head within `HEAD_TIMEOUT` of
  being accepted (or of its previous answer, for keep-alive): an idle or
  slowloris connection holds its place that long at most. Once the head is
  in, the request has until `MAX_LIFETIME` to be answered. Each socket
  operation also times out after `IO_TIMEOUT`;
- when every place is taken, a new connection takes the place of the oldest
  one still waiting for its head (counted as expired): idle and slow clients
  cannot keep a prober out, who sends its request at once and is answered
  at once. Only with every place in the middle of a request is a new
  connection closed at once, and counted (refused). So /healthz and /readyz
  answer under 70 slowloris connections, 2,000 idle ones or connect churn
  (tests/e2e/test_health_abuse.py);
- the listen backlog is `BACKLOG`;
- when accept() fails for lack of fds (EMFILE, ENFILE) or memory, the server
  sheds the pending connection with a spare fd (nginx's and libuv's trick),
  then backs off (up to `MAX_BACKOFF`) instead of spinning on a socket that
  stays readable;
- at most `MAX_COLLECTING` scrapes collect at once, so a scrape storm cannot
  hold the GIL away from the master's loop.
The master's loop runs in the main thread and never waits on any of this.
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("upgraderd")

Health = Callable[[], tuple[bool, bool, str]]  # (alive, ready, reason)

MAX_CONNECTIONS = 64
BACKLOG = 128
IO_TIMEOUT = 10.0
HEAD_TIMEOUT = 2.0
MAX_LIFETIME = 30.0
MAX_BACKOFF = 0.5
MAX_COLLECTING = 4
_SHORT_OF = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def split_address(address: str) -> tuple[str, int]:
    """Split 'host:port' or '[v6]:port' (already validated by the config)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    return ("127.0.0.1" if host == "localhost" else host), int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for slow clients
    allow_reuse_address = True
    request_queue_size = BACKLOG
    registry: CollectorRegistry
    health: Health

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        """Bind and listen; keep one spare fd for shedding connections when out of fds."""
        self.counts = {"refused": 0, "expired": 0, "accept_errors": 0}
        self.collecting = threading.BoundedSemaphore(MAX_COLLECTING)
        # connection -> (deadline, accepted or last answered, waiting for its head)
        self._conns: dict[socket.socket, tuple[float, float, bool]] = {}
        self._conns_lock = threading.Lock()
        self._backoff = 0.0
        self._spare: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept one connection; on a shortage of fds or memory, shed it and back off."""
        try:
            conn, addr = self.socket.accept()
        except OSError as e:
            if e.errno in _SHORT_OF:
                self._short_of_fds(e)
            raise  # socketserver drops the failed accept and goes back to select()
        self._backoff = 0.0
        return conn, addr

    def _short_of_fds(self, e: OSError) -> None:
        self.counts["accept_errors"] += 1
        if self._backoff == 0.0:
            log.warning("metrics endpoint: accept failed (%s); shedding connections and backing off", e.strerror)
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
            try:
                self.socket.accept()[0].close()
            except OSError:
                pass
            try:
                self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass
        self._backoff = min(MAX_BACKOFF, max(0.01, self._backoff * 2))
        time.sleep(self._backoff)  # this thread only: the master's loop is elsewhere

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit a connection, in place of the oldest one still waiting for its head if all are taken."""
        now = time.monotonic()
        with self._conns_lock:
            if len(self._conns) >= MAX_CONNECTIONS:
                waiting = [(since, c) for c, (_, since, head) in self._conns.items() if head]
                if not waiting:
                    self.counts["refused"] += 1
                    return False
                victim = min(waiting, key=lambda w: w[0])[1]
                self._conns.pop(victim)
                self.counts["expired"] += 1
                _cut(victim)
            self._conns[request] = (now + HEAD_TIMEOUT, now, True)
            return True

    def head_read(self, request: Any) -> None:
        """The request head is in: give it until MAX_LIFETIME to be answered."""
        now = time.monotonic()
        with self._conns_lock:
            if request in self._conns:
                self._conns[request] = (now + MAX_LIFETIME, now, False)

    def renew(self, request: Any) -> None:
        """Answered: a keep-alive connection has HEAD_TIMEOUT for its next request's head."""
        now = time.monotonic()
        with self._conns_lock:
            if request in self._conns:
                self._conns[request] = (now + HEAD_TIMEOUT, now, True)

    def shutdown_request(self, request: Any) -> None:
        """Close a connection and forget it."""
        with self._conns_lock:
            self._conns.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Shut down connections that outlived MAX_LIFETIME (their thread then ends)."""
        now = time.monotonic()
        with self._conns_lock:
            expired = [c for c, (deadline, _, _) in self._conns.items() if deadline < now]
        for conn in expired:
            self.counts["expired"] += 1
            _cut(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a failed connection at debug level: clients that vanish or time out are routine."""
        log.debug("metrics endpoint: connection from %s failed", client_address, exc_info=True)

    def server_close(self) -> None:
        """Close the listening socket and the spare fd."""
        super().server_close()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None


def _cut(conn: socket.socket) -> None:
    """Shut a connection down; its thread sees the end and finishes."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = IO_TIMEOUT

    def parse_request(self) -> bool:
        """Parse the head; once it is in, the connection is no longer one to make room with."""
        ok = super().parse_request()
        if ok:
            self.server.head_read(self.connection)
        return ok

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
        if not self.server.collecting.acquire(timeout=IO_TIMEOUT):
            self._send(503, b"too many scrapes at once\n")
            return
        try:
            body = encoder(self.server.registry)
        except Exception as e:  # a broken collector must not take the endpoint down
            log.exception("metrics collection failed")
            self._send(500, f"metrics collection failed: {e}\n".encode())
            return
        finally:
            self.server.collecting.release()
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
        self.server.renew(self.connection)

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

    def counts(self) -> dict[str, int]:
        """Return the endpoint's own event counts (refused, expired, accept_errors)."""
        return dict(self.httpd.counts)

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread.is_alive():
            self.httpd.shutdown()
            self._thread.join(5)
        self.httpd.server_close()
