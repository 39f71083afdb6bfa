"""An HTTP server that binds its own SO_REUSEPORT socket: upgraderd's worker-bind mode.

    python3 reuseport_server.py --bind 127.0.0.1:8003

This stands for any program that insists on binding its address itself. It
uses only the standard library and knows nothing about upgraderd beyond the
two standards it speaks:

- It binds `--bind` (worker_bind.yaml passes `{addr:web}`; the address is
  also in $UPGRADERD_ADDR_WEB) with SO_REUSEPORT, so the workers of every
  generation can hold the same address at once.
- Once it listens, and only after its SIGTERM handler is installed, it sends
  READY=1 to $NOTIFY_SOCKET (sd_notify; '@' starts an abstract address).

Drain (SIGTERM): stop accepting, close the listener, finish the requests in
flight, exit. Closing a SO_REUSEPORT listener resets the connections still
queued on it unless net.ipv4.tcp_migrate_req=1, which is why worker_bind.yaml
has `kernel.tcp_migrate_req: set`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType


class Handler(BaseHTTPRequestHandler):
    """Answer every GET with who served it, the client's port and the path."""

    def do_GET(self) -> None:
        body = (f"generation={os.environ.get('UPGRADERD_GENERATION', '?')} "
                f"slot={os.environ.get('UPGRADERD_SLOT', '?')} pid={os.getpid()} "
                f"server=reuseport version={os.environ.get('APP_VERSION', '1')} "
                f"peer={self.client_address[1]} path={self.path}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep quiet: one line per request would drown the master's log."""


class ReusePortServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that binds with SO_REUSEPORT and joins its threads on close."""

    daemon_threads = False
    block_on_close = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def sd_notify(message: str) -> None:
    """Send `message` to $NOTIFY_SOCKET, if there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(message.encode())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default=os.environ.get("UPGRADERD_ADDR_WEB", "127.0.0.1:8003"),
                        help="host:port to listen on (default: $UPGRADERD_ADDR_WEB)")
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    ReusePortServer.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = ReusePortServer((host.strip("[]"), int(port)), Handler)

    stop: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.append(signum)  # only record: taking a lock in a handler can deadlock

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(0))
    loop = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    loop.start()
    sd_notify(f"READY=1\nSTATUS=serving {args.bind}")
    # Poll rather than block on a lock: Python runs handlers in the main thread only,
    # and a signal delivered to another thread does not wake a blocked main thread.
    while not stop:
        time.sleep(0.1)
    server.shutdown()       # stop accepting (serve_forever returns) ...
    server.server_close()   # ... close the listener, then join the request threads
    loop.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
