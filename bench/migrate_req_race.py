"""Measure: resets when SO_REUSEPORT listeners close under connect load, with tcp_migrate_req=1.

This is the kernel behaviour behind the rare reset of the worker-bind test
(tests/e2e/test_worker_bind.py): with net.ipv4.tcp_migrate_req=1 the kernel
moves a closing listener's accept queue and its half-open requests to another
listener of the group, but a handshake whose final ACK is being processed on
one CPU while the listener closes on the other is not moved: the new child
is dropped (inet_csk_reqsk_queue_add() finds the listener no longer
LISTEN) and the client gets a reset. No TcpExt counter counts it
(TCPMigrateReqFailure stays 0), which is what this prints next to the resets.

No daemon: one process holds two "generations" of two listeners each, each
with an accept thread (like the worker-bind example server), and replaces
them over and over: bind and listen two new ones, then close the two old ones,
`together` (two threads, as two draining workers do) or `one` by one.
Meanwhile `--clients` threads make a round trip per connection. It runs in a
private network namespace (as root, `unshare -n`), so the host's
tcp_migrate_req is never touched:

    unshare -n .venv/bin/python -m bench.migrate_req_race [--seconds 30] [--mode one|together]

It prints one JSON line: cycles (generations replaced), closes, round trips
ok, resets, other failures, resets per 1000 closes, and the TcpExt counters'
change over the run.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"
COUNTERS = ("TCPMigrateReqSuccess", "TCPMigrateReqFailure", "ListenOverflows", "ListenDrops")
PORT = 18080


def tcp_counters() -> dict[str, int]:
    """Return this namespace's TcpExt counters named in COUNTERS."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()
             if line.startswith("TcpExt:")]
    table = dict(zip(lines[0][1:], map(int, lines[1][1:])))
    return {name: table.get(name, -1) for name in COUNTERS}


def _serve(conn: socket.socket) -> None:
    conn.settimeout(5)
    try:
        conn.recv(100)
        conn.sendall(b"ok\n")
    except OSError:
        pass
    conn.close()


class Listener:
    """One SO_REUSEPORT listener with its accept thread; `close()` stops accepting, then closes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind(("127.0.0.1", PORT))
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.01)
            if not ready or self.stopping.is_set():
                continue
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                continue
            conn.setblocking(True)
            threading.Thread(target=_serve, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.sock.close()  # what is queued here moves to another listener (tcp_migrate_req=1)


class Clients:
    """Round trips, one connection each, until the deadline; every outcome counted."""

    def __init__(self, threads: int, seconds: float) -> None:
        self.outcomes = {"ok": 0, "reset": 0, "other": 0}
        self.lock = threading.Lock()
        self.end = time.monotonic() + seconds
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while time.monotonic() < self.end:
            try:
                with socket.create_connection(("127.0.0.1", PORT), timeout=5) as s:
                    s.sendall(b"hi\n")
                    outcome = "ok" if s.recv(10) == b"ok\n" else "other"
            except ConnectionResetError:
                outcome = "reset"
            except OSError:
                outcome = "other"
            with self.lock:
                self.outcomes[outcome] += 1

    def join(self) -> dict[str, int]:
        for t in self.threads:
            t.join()
        return self.outcomes


def close_all(old: list[Listener], mode: str) -> None:
    """Close `old` at once from one thread each (`together`) or one after the other (`one`)."""
    if mode == "one":
        for lis in old:
            lis.close()
            time.sleep(0.01)
        return
    closers = [threading.Thread(target=lis.close) for lis in old]
    for t in closers:
        t.start()
    for t in closers:
        t.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--mode", choices=("one", "together"), default="together")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    if os.environ.get("HOST_NETNS") == os.readlink("/proc/self/ns/net"):
        print("refusing to run in the host's network namespace; use unshare -n", file=sys.stderr)
        return 2
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    Path(MIGRATE_REQ).write_text("1\n")
    generation = [Listener(), Listener()]
    before = tcp_counters()
    clients = Clients(args.clients, args.seconds)
    cycles = 0
    while time.monotonic() < clients.end - 0.5:
        new = [Listener(), Listener()]
        time.sleep(0.03)  # the new generation serves a while before the old one drains
        close_all(generation, args.mode)
        generation, cycles = new, cycles + 1
    outcomes = clients.join()
    close_all(generation, args.mode)
    after = tcp_counters()
    closes = 2 * cycles
    print(json.dumps({"mode": args.mode, "cycles": cycles, "closes": closes, **outcomes,
                      "resets_per_1000_closes": round(1000 * outcomes["reset"] / max(closes, 1), 2),
                      "tcp": {k: after[k] - before[k] for k in COUNTERS}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
