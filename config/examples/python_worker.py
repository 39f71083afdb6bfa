"""Your own Python server under upgraderd, with the `upgraderd.worker` helper.

    upgraderd run -c config/examples/python_worker.yaml

The helper does the three things a worker owes the master, in this order:
1. `worker.listeners()`: the named listening sockets (inherited fds, or bound
   here with SO_REUSEPORT for a worker-bind listener);
2. `worker.on_drain()`: catch the drain signal, installed *before*
   saying ready, or the signal's default action could kill a worker that is
   already taking connections; `drain.wait()` then blocks until it arrives;
3. `worker.ready()`: READY=1 to the master; `worker.status()` for STATUS= lines.

The HTTP part is the standard library's ThreadingHTTPServer, one per listener,
serving the socket it is handed instead of binding one.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from upgraderd import worker


class Handler(BaseHTTPRequestHandler):
    """Answer every GET with who served it, the client's port and the path."""

    def do_GET(self) -> None:
        body = (f"generation={os.environ.get('UPGRADERD_GENERATION', '?')} "
                f"slot={os.environ.get('UPGRADERD_SLOT', '?')} pid={os.getpid()} "
                f"server=python-worker version={os.environ.get('APP_VERSION', '1')} "
                f"peer={self.client_address[1]} path={self.path}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep quiet: one line per request would drown the master's log."""


class InheritedServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer on a socket that is already listening."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock.getsockname()[:2], Handler, bind_and_activate=False)
        self.socket.close()
        # Other workers accept on the same socket: a blocking accept() after a
        # wake-up another worker won could hang here, deaf to shutdown().
        sock.setblocking(False)
        self.socket = sock

    def get_request(self) -> tuple[socket.socket, object]:
        conn, addr = self.socket.accept()
        conn.setblocking(True)
        return conn, addr


def main() -> int:
    socks = worker.listeners()
    if not socks:
        print("python_worker: no listeners; run me under upgraderd", file=sys.stderr)
        return 2
    servers = [InheritedServer(sock) for sock in socks.values()]
    drain = worker.on_drain()
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05})
               for s in servers]
    for t in threads:
        t.start()
    worker.ready(f"serving {', '.join(socks)}")
    drain.wait()
    worker.status("draining")
    for s in servers:
        s.shutdown()        # stop accepting; what the kernel queued stays for the next generation
        s.server_close()    # close our copy of the socket, then join the request threads
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
