"""Run an ASGI app with uvicorn under upgraderd, and drain it without losing a request.

    python config/examples/uvicorn_server.py [--loop auto|asyncio|uvloop] asgi_app:app

uvicorn.yaml starts it. It uses uvicorn's programmatic API (`uvicorn.Config`,
`uvicorn.Server`) on the sockets upgraderd passes (LISTEN_FDS, fd 3 on), and
changes three things that lose requests when a uvicorn is replaced under load:

- **The sockets keep their real family.** `socket.socket(fileno=fd)` asks the
  kernel for the family; uvicorn's `--fd` wraps the fd as AF_UNIX, so
  TCP_NODELAY is never set and keep-alive answers wait on delayed ACKs.
- **This file owns the accept loop.** A reader on each listening fd accepts
  until EAGAIN and hands each connection to `loop.connect_accepted_socket()`.
  To stop accepting it removes its own reader, which works on uvloop too, and
  then waits for the hand-offs already started. asyncio's `Server.close()`
  (CPython issue #109564) and removing the reader of a uvloop server (a no-op)
  both leave connections accepted and never served.
- **Draining is HTTP-aware.** From the drain signal on, every response starts
  with `Connection: close`, so each keep-alive client is told to reconnect on
  its next answer. A connection with a request in progress is never closed.
  An idle one is closed only once it has stayed silent for `--idle-grace`
  seconds with nothing unread in the kernel; then the process exits.

Signal handlers are installed (by `Server.serve`) before READY=1 is sent, so
the drain signal can never kill a worker that holds connections.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import atexit
import fcntl
import logging
import os
import signal
import socket
import sys
import termios
from types import FrameType
from typing import Any, Awaitable, Callable

import uvicorn

log = logging.getLogger("uvicorn.error")

ACCEPT_BATCH = 64       # accepts per wake-up; other workers may share the queue
POLL_INTERVAL = 0.05    # seconds between looks at the draining connections
Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]


def inherited_sockets() -> list[socket.socket]:
    """Return the sockets passed by socket activation, each with its real family."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # meant for this process, not for its children
    socks = [socket.socket(fileno=fd) for fd in range(3, 3 + count)]
    for sock in socks:
        sock.setblocking(False)  # the flag is shared with every process holding the socket
    return socks


def sd_notify(message: str) -> None:
    """Send `message` to $NOTIFY_SOCKET, if there is one."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(message.encode())


def unread_bytes(transport: asyncio.BaseTransport) -> int:
    """Return how many bytes wait unread in the kernel for this connection (0 if unknown)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return 0
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    except OSError:
        return 0
    return buf[0]


class Drain:
    """The drain state shared by the app wrapper, the protocols and the server."""

    def __init__(self, idle_grace: float) -> None:
        self.idle_grace = idle_grace
        self.started_at: float | None = None

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def wrap_app(self, app: ASGIApp) -> ASGIApp:
        """Return `app` with `Connection: close` added to every response started while draining."""
        async def wrapped(scope: Scope, receive: Callable[[], Awaitable[Message]],
                          send: Callable[[Message], Awaitable[None]]) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)

            async def send_closing(message: Message) -> None:
                if message["type"] == "http.response.start" and self.draining:
                    headers = [*message.get("headers", []), (b"connection", b"close")]
                    message = {**message, "headers": headers}
                await send(message)
            await app(scope, receive, send_closing)
        return wrapped

    def track_reads(self, protocol_class: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
        """Return a subclass of uvicorn's HTTP protocol that records when bytes last arrived."""
        loop_time = asyncio.get_running_loop().time

        class Tracked(protocol_class):  # type: ignore[valid-type, misc]
            last_read = 0.0
            drains_by_grace = True

            def data_received(self, data: bytes) -> None:
                self.last_read = loop_time()
                super().data_received(data)
        return Tracked

    def may_close(self, protocol: Any, now: float) -> bool:
        """Return True if no request can be in progress or arriving on `protocol`'s connection."""
        assert self.started_at is not None
        cycle = getattr(protocol, "cycle", None)
        if cycle is not None and not cycle.response_complete:
            return False            # a request is being answered: its response says close
        if getattr(protocol, "pipeline", None):
            return False            # queued pipelined requests still to answer
        quiet_since = max(self.started_at, getattr(protocol, "last_read", 0.0))
        if now - quiet_since < self.idle_grace:
            return False            # a request may be on its way: wait for it
        return unread_bytes(protocol.transport) == 0


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with its own accept loop, READY=1 and a lossless drain."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self.listening: list[socket.socket] = []
        self.attaching: set[asyncio.Task[Any]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drained = False
        self.drain_begun = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start the app, accept on `sockets`, then tell the master READY=1."""
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(3)  # uvicorn's STARTUP_FAILURE
        config = self.config
        config.loaded_app = self.drain.wrap_app(config.loaded_app)
        config.http_protocol_class = self.drain.track_reads(config.http_protocol_class)
        self.servers = []   # no asyncio Server: uvicorn's shutdown has none to close
        loop = self.loop = asyncio.get_running_loop()
        for sock in sockets or []:
            loop.add_reader(sock.fileno(), self._accept, sock)
            self.listening.append(sock)
        self.started = True
        names = ", ".join(str(s.getsockname()) for s in self.listening)
        log.info("serving %s on %s", names, type(loop).__module__)
        sd_notify(f"READY=1\nSTATUS=serving {names}")

    def _protocol(self) -> asyncio.Protocol:
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state)

    def _accept(self, sock: socket.socket) -> None:
        """Accept what is queued on `sock` (up to a batch) and start serving it."""
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return      # empty, or another worker took it
            except OSError as e:
                log.warning("accept on %s: %s", sock.getsockname(), e)
                return      # EMFILE and friends: try again on the next wake-up
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(loop.connect_accepted_socket(self._protocol, conn, ssl=self.config.ssl))
            self.attaching.add(task)
            task.add_done_callback(self._attached)

    def _attached(self, task: asyncio.Task[Any]) -> None:
        self.attaching.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a connection could not be served: %r", task.exception())

    async def main_loop(self) -> None:
        """Run uvicorn's 0.1 s ticks, but return as soon as the drain begins."""
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            try:
                await asyncio.wait_for(self.drain_begun.wait(), 0.1)
            except asyncio.TimeoutError:
                pass

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Start draining at once, not at uvicorn's next 0.1 s tick."""
        super().handle_exit(sig, frame)
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        """Mark every later response `Connection: close` and stop accepting."""
        if self.drain.draining:
            return
        loop = asyncio.get_running_loop()
        self.drain.started_at = loop.time()
        self.drain_begun.set()
        log.info("draining: stopped accepting; every answer from now on says Connection: close")
        for sock in self.listening:
            loop.remove_reader(sock.fileno())
            sock.close()    # our copy only: what is queued stays for the next generation

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop accepting, let every connection end on a response, then shut the app down."""
        loop = asyncio.get_running_loop()
        self._begin_drain()
        if self.attaching:
            await asyncio.wait(set(self.attaching))
        for protocol in list(self.server_state.connections):
            if not getattr(protocol, "drains_by_grace", False):
                protocol.shutdown()     # WebSocket: uvicorn's close frame 1012, service restart
        deadline = loop.time() + (self.config.timeout_graceful_shutdown or 30.0)
        while self.server_state.connections and loop.time() < deadline and not self.force_exit:
            now = loop.time()
            for protocol in list(self.server_state.connections):
                if getattr(protocol, "drains_by_grace", False) and self.drain.may_close(protocol, now):
                    protocol.transport.close()
            await asyncio.sleep(POLL_INTERVAL)
        await self._finish(deadline)
        self.drained = True

    async def _finish(self, deadline: float) -> None:
        """Cut what outlived the deadline, wait for the app's tasks, run the lifespan shutdown."""
        loop = asyncio.get_running_loop()
        if self.server_state.connections:
            log.warning("cutting %d connection(s) still open at the drain deadline",
                        len(self.server_state.connections))
            for protocol in list(self.server_state.connections):
                protocol.transport.close()
        while self.server_state.tasks and loop.time() < deadline and not self.force_exit:
            await asyncio.sleep(POLL_INTERVAL)
        for task in self.server_state.tasks:
            task.cancel(msg="the graceful shutdown timed out")
        if not self.force_exit:
            await self.lifespan.shutdown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Return the command-line arguments."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("app", help="the ASGI app, as module:attribute")
    ap.add_argument("--app-dir", default=".", help="directory to import the app from")
    ap.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"],
                    help="event loop; auto is uvloop when it is installed")
    ap.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"])
    ap.add_argument("--idle-grace", type=float, default=1.0,
                    help="seconds an idle keep-alive connection may stay open while draining")
    ap.add_argument("--timeout-graceful-shutdown", type=float, default=20.0,
                    help="seconds to drain before the remaining connections are cut")
    ap.add_argument("--access-log", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve the app on the inherited sockets until the drain signal, then drain."""
    args = parse_args(argv)
    # Handlers for the time outside Server.serve(): before it, a drain signal means
    # exit now (there is nothing to drain); after it, uvicorn re-raises the signal
    # it caught, and the drain is already done.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_now)
    socks = inherited_sockets()
    if not socks:
        print("uvicorn_server: no LISTEN_FDS sockets; run me under upgraderd", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.abspath(args.app_dir))
    config = uvicorn.Config(args.app, loop=args.loop, http=args.http, access_log=args.access_log,
                            timeout_graceful_shutdown=int(args.timeout_graceful_shutdown))
    server = DrainingServer(config, Drain(args.idle_grace))
    # Registered before the app is imported, so it runs after the app's own atexit handlers.
    atexit.register(_skip_finalization, server)
    server.run(sockets=socks)
    return 0


def _skip_finalization(server: DrainingServer) -> None:
    """After a complete drain, end the process without the interpreter's finalization.

    Tearing down the modules of uvicorn and its loop took about 0.6 s of a 0.75 s drain
    on a loaded machine, with every connection already closed and the lifespan shutdown
    done. The app's atexit handlers have run by now; logging is flushed here.
    """
    if server.drained:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _exit_now(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    raise SystemExit(main())
