"""Benchmark: UDP datagrams lost across reloads, held slot sockets vs new sockets per generation.

Both variants run the real daemon, the same closed-loop UDP echo client with
sequence numbers (tests/support/udpload.py; a datagram not answered within
`--timeout` is lost) and the same HUP schedule, alternately in one run:

- held (the design): `protocol: udp, mode: reuseport`. The master binds one
  socket per slot and keeps it across generations; the built-in echo workers
  of generation N+1 read from the very sockets generation N read from.
- fresh: the usual way to restart a reuseport UDP server. Each worker binds
  its own SO_REUSEPORT socket (a `command` worker, this module's `--worker`),
  says READY=1, and on the drain signal answers what is queued on its socket
  until EAGAIN and closes it. Until it closes, the kernel keeps hashing new
  datagrams over the old sockets too; those that arrive after the last read
  die with the socket. No steering program moves them (that is what
  udpgrm adds with eBPF).

    .venv/bin/python -m bench.udp [--repeats 3] [--hups 20] [--interval 1] [--flows 4]

It prints, per variant, the median over repeats of datagrams sent, lost (never
answered) and lost per reload, each repeat's loss, and answers that came after
the client's timeout (slow, not lost). The machine is shared and noisy (2
cores): compare the two rows of one run, not figures across runs.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.support.udpload import UdpLoad, free_udp_port
from tests.support.upgraderd_proc import Daemon, echo_config, free_port, wait_until


def held_config(port: int, workers: int) -> dict[str, object]:
    cfg = echo_config(port, count=workers)
    cfg["listeners"] = [{"name": "dns", "host": "127.0.0.1", "port": port, "protocol": "udp"}]
    return cfg


def fresh_config(port: int, workers: int) -> dict[str, object]:
    cfg = echo_config(free_port(), count=workers, mode="shared")
    cfg["workers"] = {"count": workers, "command": [sys.executable, "-m", "bench.udp", "--worker", str(port)]}
    return cfg


def worker(port: int) -> int:
    """A reuseport UDP echo server that binds its own socket (the `fresh` variant)."""
    draining: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: draining.append(1))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    notify = os.environ["NOTIFY_SOCKET"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as n:
        n.connect("\0" + notify[1:] if notify.startswith("@") else notify)
        n.sendall(b"READY=1")
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    while True:
        if draining:
            _answer(sock, 100_000)   # what is queued now, then the socket closes
            sock.close()
            return 0
        if sel.select(0.5):
            _answer(sock, 64)


def _answer(sock: socket.socket, limit: int) -> None:
    for _ in range(limit):
        try:
            data, addr = sock.recvfrom(65535)
        except BlockingIOError:
            return
        sock.sendto(data, addr)



def run_once(variant: str, args: argparse.Namespace, workdir: Path) -> tuple[int, int, int]:
    """Run `args.hups` reloads under load; return (datagrams sent, lost, answered late)."""
    port = free_udp_port()
    cfg = (held_config if variant == "held" else fresh_config)(port, args.workers)
    with Daemon(workdir, cfg) as d:
        d.start()
        # Bounded by the run's length; the count bound is far above what 20 s of HUPs send.
        load = UdpLoad(port, flows=args.flows, timeout=args.timeout, max_per_flow=20_000_000).start()
        try:
            wait_until(lambda: load.answered >= 100, 20, "the first answers")
            for gen in range(2, args.hups + 2):
                d.reload_to(gen)
                time.sleep(args.interval)  # the schedule of the bench: a HUP every `interval` seconds
        finally:
            load.stop()
        d.stop()
    return load.sent, len(load.lost), load.late


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.udp", description=__doc__.split("\n")[0])
    p.add_argument("--worker", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hups", type=int, default=20)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between a reload's end and the next HUP")
    p.add_argument("--flows", type=int, default=4, help="closed-loop client flows")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1.0, help="a datagram not answered by then is lost")
    args = p.parse_args()
    if args.worker is not None:
        return worker(args.worker)
    rows: dict[str, list[tuple[int, int, int]]] = {"held": [], "fresh": []}
    with tempfile.TemporaryDirectory(prefix="bench-udp-") as tmp:
        for r in range(args.repeats):
            for variant in rows:
                workdir = Path(tmp) / f"{variant}-{r}"
                workdir.mkdir()
                sent, lost, late = run_once(variant, args, workdir)
                rows[variant].append((sent, lost, late))
                print(f"  repeat {r + 1} {variant:5}: {sent} sent, {lost} lost, {late} late",
                      file=sys.stderr, flush=True)
    print(f"{args.hups} HUPs {args.interval:g} s apart, {args.workers} workers, {args.flows} closed-loop flows, "
          f"timeout {args.timeout:g} s, median of {args.repeats} (2 shared cores, noisy)")
    print("| variant | sent | lost | lost per reload | lost in each repeat | answered late (not lost) |")
    print("|---|---|---|---|---|---|")
    for variant, runs in rows.items():
        median = statistics.median(x[1] for x in runs)
        print(f"| {variant} | {statistics.median(x[0] for x in runs):.0f} | {median:.0f} | "
              f"{median / args.hups:.2f} | {', '.join(str(x[1]) for x in runs)} | "
              f"{statistics.median(x[2] for x in runs):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
