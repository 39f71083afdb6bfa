"""The built-in echo worker's data path: replies the kernel cannot take at once, and many connections.

The loop sends a reply straight from the read and watches a connection for
writing only when the kernel did not take it all (upgraderd/apps/server.py).
These tests drive both branches through the real daemon: a client that sends
far more than the socket buffers hold before it reads anything (partial
sends, the output queue, the high-water mark that stops reading), and many
short connections at once (one accept per wake-up, the send-from-read path, and
the byte counts the loop keeps for the metrics).
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import termios
import threading
import time

import pytest

from tests.support.scrape import scrape, value
from tests.support.upgraderd_proc import Daemon, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e

PAYLOAD = 6 << 20  # far more than the loopback socket buffers and the worker's 1 MiB high-water mark


def read_exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    """Read `n` bytes, failing the test at `deadline` (monotonic)."""
    got = bytearray()
    while len(got) < n:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            chunk = sock.recv(min(1 << 20, n - len(got)))
        except TimeoutError:
            raise AssertionError(f"only {len(got)} of {n} bytes back in time") from None
        assert chunk, f"the worker closed after {len(got)} of {n} bytes"
        got += chunk
        assert time.monotonic() < deadline, f"only {len(got)} of {n} bytes back in time"
    return bytes(got)


def test_a_reply_larger_than_the_buffers_comes_back_whole_and_in_order(tmp_path):
    port = free_port()
    payload = bytes(i * 7 % 251 for i in range(PAYLOAD))
    with Daemon(tmp_path, echo_config(port, count=1)).start():
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sent: list[BaseException] = []

            def send_all() -> None:
                try:
                    sock.sendall(payload)
                except OSError as e:
                    sent.append(e)
            writer = threading.Thread(target=send_all)
            writer.start()
            # Read only once the writer is stuck: the worker has queued replies and stopped reading.
            wait_until(lambda: not writer.is_alive() or _send_queue(sock) > 0, 10, "the client's send queue to fill")
            back = read_exactly(sock, PAYLOAD, time.monotonic() + 30)
            writer.join(10)
            assert not writer.is_alive() and sent == []
            assert back == payload
            # The connection still serves small round trips after the backlog is gone.
            sock.sendall(b"ping")
            assert read_exactly(sock, 4, time.monotonic() + 5) == b"ping"


def test_a_client_that_never_reads_does_not_hold_up_the_others(tmp_path):
    # The loop leaves a connection's fd blocking and says MSG_DONTWAIT on every read and
    # write (upgraderd/apps/conn.py): a write that forgot it would block the whole worker here.
    port = free_port()
    with Daemon(tmp_path, echo_config(port, count=1)).start():
        with socket.create_connection(("127.0.0.1", port), timeout=5) as stuck:
            stuck.setblocking(False)
            pushed, deadline = 0, time.monotonic() + 20
            # Send without reading until the kernel takes no more: the worker's replies to us
            # fill our receive buffer, it queues the rest, then it stops reading us.
            while time.monotonic() < deadline:
                try:
                    pushed += stuck.send(b"x" * 65536)
                except BlockingIOError:
                    if _send_queue(stuck) > 0:
                        break
                    wait_until(lambda: _writable(stuck) or _send_queue(stuck) > 0, 5, "the send queue to move")
            assert _send_queue(stuck) > 0, f"the send queue never filled ({pushed} bytes pushed)"
            for i in range(20):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as other:
                    other.sendall(b"ping %d" % i)
                    assert read_exactly(other, len(b"ping %d" % i), time.monotonic() + 5) == b"ping %d" % i


def _writable(sock: socket.socket) -> bool:
    return bool(select.select([], [sock], [], 0)[1])


def _send_queue(sock: socket.socket) -> int:
    """Return the bytes the kernel holds unsent for `sock` (SIOCOUTQ, the same number as TIOCOUTQ)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])


def test_many_short_connections_are_all_echoed_and_counted(tmp_path):
    port = free_port()
    cfg = echo_config(port, count=2)
    clients, rounds, message = 16, 25, b"0123456789abcdef" * 4  # 64-byte messages
    failures: list[str] = []

    def client(i: int) -> None:
        for r in range(rounds):
            msg = message[:60] + f"{i:02d}{r:02d}".encode()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(msg)
                    back = read_exactly(s, len(msg), time.monotonic() + 5)
            except (OSError, AssertionError) as e:
                failures.append(f"client {i} round {r}: {e}")
                return
            if back != msg:
                failures.append(f"client {i} round {r}: {back!r}")
                return

    with Daemon(tmp_path, cfg).start():
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert failures == []
        total = clients * rounds

        def counted() -> dict[str, float] | None:
            s = scrape(cfg)
            done = s and value(s, "upgraderd_connections_closed_total", listener="echo") == total
            return s if done else None
        s = wait_until(counted, 10, f"{total} closed connections in the metrics")
        assert value(s, "upgraderd_connections_accepted_total", listener="echo") == total
        assert value(s, "upgraderd_bytes_received_total", listener="echo") == total * len(message)
        assert value(s, "upgraderd_bytes_sent_total", listener="echo") == total * len(message)
        assert value(s, "upgraderd_connections_active", listener="echo", state="active") == 0
