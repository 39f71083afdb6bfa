"""Benchmark: many persistent connections moved across HUPs, with 0 lost.

One daemon runs config/upgraderd.yaml as shipped (prefork, warm standby,
drain.handoff auto) with --workers workers. --clients client processes (this
module with --client) hold --connections persistent echo connections between
them, each from its own source address 127.0.0.(10+i) (an address has about
28,000 ephemeral ports) and with RLIMIT_NOFILE raised to its hard limit
(20,000 here). Every connection carries a numbered message per round and must
get it back byte for byte; one that fails, is reset, or stays silent past
--timeout is counted and never replaced. After all are connected, --hups
reloads are sent, each once the previous old generation has retired. It
reports, per HUP: HUP -> ACTIVE and the old generation's time from DRAINING
(its successor ACTIVE, the same loop pass) to RETIRED, both the master's own
figures; the master's RSS before and after each HUP; and in the end, the
round trips and failures of every connection, after one last full round.

    .venv/bin/python -m bench.connections [--connections 50000] [--clients 5] [--hups 5] [--keep-log PATH]

Bounded: clients stop at --max-seconds; every process started is stopped by
its pid (clients by SIGTERM then SIGKILL, the daemon by Daemon.stop). CI
runs a small sample of it (tests/e2e/test_connections.py), never 50,000.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.scale import children, kib, shipped
from tests.support import ROOT
from tests.support.upgraderd_proc import Daemon, wait_until

MSG = 16   # bytes per message: connection number and round, 8 digits each


class Clients:
    """One client process's connections, driven round by round from one epoll loop."""

    def __init__(self, port: int, count: int, source: str, timeout: float) -> None:
        self.timeout = timeout
        self.failures: Counter[str] = Counter()
        self.ok = 0
        self.socks: dict[int, socket.socket] = {}
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((source, 0))
            s.settimeout(timeout)
            try:
                s.connect(("127.0.0.1", port))
            except OSError as e:
                self.failures[f"connect: {e.strerror or e}"] += 1
                s.close()
                continue
            s.setblocking(False)
            self.socks[s.fileno()] = s

    def round(self, number: int) -> None:
        """Send each live connection its message and wait for every answer (or count it lost)."""
        ep = select.epoll()
        want: dict[int, bytes] = {}
        got: dict[int, bytes] = {}
        for fd, s in list(self.socks.items()):
            msg = f"{fd:08d}{number % 10**8:08d}".encode()
            try:
                s.send(msg)   # 16 bytes fit in any send buffer
            except OSError as e:
                self._lose(fd, f"send: {e.strerror or e}")
                continue
            want[fd], got[fd] = msg, b""
            ep.register(fd, select.EPOLLIN)
        deadline = time.monotonic() + self.timeout
        while want and time.monotonic() < deadline:
            for fd, _ev in ep.poll(max(0.0, deadline - time.monotonic())):
                self._read(fd, want, got, ep)
        for fd in list(want):
            ep.unregister(fd)
            self._lose(fd, "timeout")
        ep.close()

    def _read(self, fd: int, want: dict[int, bytes], got: dict[int, bytes], ep: select.epoll) -> None:
        try:
            data = self.socks[fd].recv(MSG - len(got[fd]))
        except BlockingIOError:
            return
        except OSError as e:
            data, why = b"", f"recv: {e.strerror or e}"
        else:
            why = "closed by the server"
        if not data:
            ep.unregister(fd)
            del want[fd]
            self._lose(fd, why)
            return
        got[fd] += data
        if len(got[fd]) == MSG:
            ep.unregister(fd)
            if got[fd] != want.pop(fd):
                self._lose(fd, "wrong answer")
            else:
                self.ok += 1

    def _lose(self, fd: int, why: str) -> None:
        self.failures[why] += 1
        self.socks.pop(fd).close()


def handoffs(log: str, generation: int) -> tuple[list[float], int, int]:
    """Return each old worker's hand-off time in ms (its own `handed N of M ... in X ms` line) for
    `generation`, and the connections handed and held in all."""
    found = re.findall(rf"worker generation {generation} slot \d+: handed (\d+) of (\d+) connection\(s\) "
                       r"to \d+ worker\(s\) in (\d+) ms", log)
    return [float(ms) for _, _, ms in found], sum(int(g) for g, _, _ in found), sum(int(h) for _, h, _ in found)


def client_main(port: int, count: int, source: str, timeout: float, pause: float, max_seconds: float) -> None:
    """Run as one client process: connect, report, do rounds until SIGTERM, one last round, report."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    end = time.monotonic() + max_seconds
    c = Clients(port, count, source, timeout)
    print(json.dumps({"connected": len(c.socks), "failures": dict(c.failures)}), flush=True)
    n = 0
    while not stop and time.monotonic() < end:
        n += 1
        c.round(n)
        time.sleep(pause)   # the bench's own pace between rounds, not a wait for a condition
    c.round(n + 1)          # the last round: every connection still held answers once more
    print(json.dumps({"rounds": n + 1, "ok": c.ok, "held": len(c.socks), "failures": dict(c.failures)}),
          flush=True)


def run(args: argparse.Namespace) -> int:
    cfg = shipped(args.workers)
    port = cfg["listeners"][0]["port"]
    per = [args.connections // args.clients + (i < args.connections % args.clients) for i in range(args.clients)]
    with tempfile.TemporaryDirectory() as tmp, Daemon(Path(tmp), cfg) as d:
        d.start(wait=False)
        d.wait_log(r"serving: generation 1 ACTIVE", timeout=120)
        procs = [subprocess.Popen(
            [sys.executable, "-m", "bench.connections", "--client", str(port), str(n), f"127.0.0.{10 + i}",
             str(args.timeout), str(args.pause), str(args.max_seconds)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT) for i, n in enumerate(per)]
        try:
            hello = [json.loads(p.stdout.readline() or "{}") for p in procs]   # type: ignore[union-attr]
            connected = sum(h.get("connected", 0) for h in hello)
            print(f"{connected} of {args.connections} connected from {args.clients} processes "
                  f"({args.workers} workers); connect failures: {[h.get('failures') for h in hello]}", flush=True)
            rss = [kib(f"/proc/{d.pid}/status", "VmRSS")]
            for n in range(2, args.hups + 2):
                d.send(signal.SIGHUP)
                d.wait_log(rf"generation {n - 1} DRAINING -> RETIRED", timeout=120)
                rss.append(kib(f"/proc/{d.pid}/status", "VmRSS"))
            log = d.log()
            if args.keep_log:
                Path(args.keep_log).write_text(log)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            results = []
            for p in procs:
                try:
                    out, _ = p.communicate(timeout=args.timeout * 3 + 30)
                    results.append(json.loads(out.strip().splitlines()[-1]))
                except (subprocess.TimeoutExpired, ValueError, IndexError):
                    p.kill()
                    p.wait()
                    results.append({"failures": {"client did not report": 1}})
    took = [float(x) for x in re.findall(r"ACTIVE ([0-9.]+)s after HUP", log)]
    retired = {int(g): float(s) for g, s in re.findall(r"generation (\d+) DRAINING -> RETIRED after ([0-9.]+)s", log)}
    print(f"{'HUP':>3} {'HUP->ACTIVE':>11} {'old gen retired after':>21} {'master RSS':>10} "
          f"{'hand-off per old worker p50 / max':>33} {'handed':>13}")
    for i, t in enumerate(took):
        ms, given, held = handoffs(log, i + 1)
        per = f"{statistics.median(ms):.0f} / {max(ms):.0f} ms" if ms else "-"
        print(f"{i + 1:>3} {t * 1e3:>8.0f} ms {retired.get(i + 1, float('nan')):>19.2f} s {rss[i + 1] / 1024:>7.1f} MB "
              f"{per:>33} {f'{given} of {held}':>13}")
    failures: Counter[str] = Counter()
    for r in results:
        failures.update(r.get("failures", {}))
    held = sum(r.get("held", 0) for r in results)
    print(f"master RSS before the first HUP {rss[0] / 1024:.1f} MB, after the last {rss[-1] / 1024:.1f} MB")
    print(f"connections held to the end: {held} of {connected}; round trips ok: "
          f"{sum(r.get('ok', 0) for r in results)}; rounds per client: {[r.get('rounds') for r in results]}; "
          f"failures: {dict(failures) or 0}")
    return 0 if held == connected == args.connections and not failures else 1


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        port, count, source, timeout, pause, max_seconds = sys.argv[2:8]
        client_main(int(port), int(count), source, float(timeout), float(pause), float(max_seconds))
        return
    # A SIGTERM unwinds the with-blocks, so the daemon and its workers are stopped by pid.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=50_000)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--hups", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=15.0, help="seconds a connection may stay silent")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between a client's rounds")
    ap.add_argument("--max-seconds", type=float, default=600.0)
    ap.add_argument("--keep-log", help="write the daemon's log (the workers' `handed N of M` lines) here")
    raise SystemExit(run(ap.parse_args()))


if __name__ == "__main__":
    main()
