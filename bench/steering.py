"""Benchmark: connections lost when reuseport slot sockets close, with and without steering.

Drives `ListenerSet` directly, as the master would, with real child processes
that accept on the slot sockets (no master, no daemon), under echo load with
a new connection per round trip. It runs in a private network namespace
(`unshare -n`, as root) with net.ipv4.tcp_migrate_req=0, so the kernel resets
whatever is queued on a listener when it closes, and the host's setting is
never touched. Two scenarios, each with and without steering, in one run:

- grow: 2 serving slots; a "reload" binds 2 more slot sockets that nobody
  accepts on (their generation fails), holds them `--hold` seconds, closes them.
- ttou: 3 serving slots; slot 2 retires (its worker accepts until EAGAIN,
  then exits and the socket closes), then comes back as a fresh worker.
  With steering the slot is steered away and parked first.
- crash: 3 serving slots; slot 2's worker is SIGKILLed and respawned after a
  `--backoff` (the master's crash back-off). With steering the slot is
  steered away while it has no worker, and back once the new one is ready.

    .venv/bin/python -m bench.steering [--repeats 3] [--rounds 5] [--hold 0.5] [--backoff 1]

It prints, per scenario and mode, the median over repeats of: resets and
other failed round trips per run, round trips per second, the round trips
that took over STALL seconds (they waited in a queue nobody served), and the
slowest successful round trip.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Callable

from tests.support.loadgen import Load, Result  # noqa: E402
from upgraderd.config import schema  # noqa: E402
from upgraderd.config.schema import Config  # noqa: E402
from upgraderd.system import sockets  # noqa: E402
from upgraderd.system.sockets import ListenerSet  # noqa: E402

MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"
STALL = 0.5
NOT_FAILURES = ("ok", "rate", "max_ms", "stalled", "reset")
PAYLOAD = 56  # what loadgen's echo client sends per round trip


def acceptor(fd: int) -> None:
    """Serve echo on listening `fd`; on SIGTERM accept until EAGAIN, serve those, and exit."""
    lsock = socket.socket(fileno=fd)
    lsock.setblocking(False)
    draining = False

    def drain(signum: int, frame: object) -> None:
        nonlocal draining
        draining = True

    signal.signal(signal.SIGTERM, drain)
    print("ready", flush=True)
    while True:
        select.select([lsock], [], [], 0.02)
        while True:
            try:
                conn, _ = lsock.accept()
            except BlockingIOError:
                break
            serve(conn)
        if draining:
            lsock.close()
            return


def serve(conn: socket.socket) -> None:
    conn.setblocking(True)
    conn.settimeout(2)
    try:
        data = b""
        while len(data) < PAYLOAD:
            chunk = conn.recv(PAYLOAD - len(data))
            if not chunk:
                break
            data += chunk
        conn.sendall(data)
    except OSError:
        pass
    conn.close()


class Rig:
    """A ListenerSet for one port plus the acceptor processes on its slots."""

    def __init__(self, count: int, steer: bool) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.cfg: Config = schema.parse(
            f"listeners:\n  - {{name: web, host: 127.0.0.1, port: {self.port}}}\n"
            f"workers: {{count: {count}, app: echo}}\n")
        self.steering = steer
        self.ls = ListenerSet()
        self.ls.ensure(self.cfg)
        self.workers: dict[int, subprocess.Popen[str]] = {}
        for slot in range(count):
            self.spawn(slot)
        self.steer(range(count))

    def key(self, slot: int) -> sockets.SocketKey:
        return sockets.key_for(self.cfg.listeners[0], slot)

    def spawn(self, slot: int) -> None:
        """Start an acceptor on `slot` and wait until it says it is ready."""
        fd = self.ls.child_fds(self.cfg, slot).fds[0]
        p = subprocess.Popen([sys.executable, __file__, "--acceptor", str(fd)], pass_fds=[fd],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        self.workers[slot] = p

    def steer(self, slots: range | list[int]) -> None:
        if self.steering:
            note = self.ls.steer(self.cfg, slots)
            assert note is None, note

    def kill(self, slot: int) -> None:
        """SIGKILL the acceptor of `slot`, as a crash."""
        p = self.workers.pop(slot)
        p.kill()
        p.wait(10)

    def stop(self, slot: int) -> None:
        """SIGTERM the acceptor of `slot` and wait for it (it drains first)."""
        p = self.workers.pop(slot)
        p.send_signal(signal.SIGTERM)
        p.wait(10)

    def close(self) -> None:
        for slot in list(self.workers):
            self.stop(slot)
        self.ls.close_all()


def failing_grow(steer: bool, rounds: int, hold: float) -> dict[str, float]:
    rig = Rig(2, steer)
    load = Load("127.0.0.1", rig.port, threads=4, max_seconds=rounds * (hold + 1) + 30).start("echo")
    t0 = time.monotonic()
    try:
        load.wait_for_ok(100)
        for _ in range(rounds):
            rig.ls.ensure(rig.cfg, count=4)       # the new generation's slots 2 and 3
            time.sleep(hold)                      # the scenario: it starts, and then fails
            rig.ls.retire(sockets.keys_for(rig.cfg, [0, 1]))
            time.sleep(0.2)
    finally:
        took = time.monotonic() - t0
        result = load.stop()
        rig.close()
    return summary(result, took)


def ttou(steer: bool, rounds: int) -> dict[str, float]:
    rig = Rig(3, steer)
    load = Load("127.0.0.1", rig.port, threads=4, max_seconds=rounds * 3 + 30).start("echo")
    keep = sockets.keys_for(rig.cfg, [0, 1])
    t0 = time.monotonic()
    try:
        load.wait_for_ok(100)
        for _ in range(rounds):
            time.sleep(0.2)                       # let slot 2 take its share of the load
            rig.steer([0, 1])
            # Today's master closes its copy at once; with steering it parks it.
            rig.ls.retire(keep, held={rig.key(2)})
            rig.stop(2)
            rig.ls.retire(keep)
            rig.ls.ensure(rig.cfg, slots=[2])     # TTIN: slot 2 comes back
            rig.spawn(2)
            rig.steer([0, 1, 2])
    finally:
        took = time.monotonic() - t0
        result = load.stop()
        rig.close()
    return summary(result, took)


def crash(steer: bool, rounds: int, backoff: float) -> dict[str, float]:
    rig = Rig(3, steer)
    load = Load("127.0.0.1", rig.port, threads=4, max_seconds=rounds * (backoff + 2) + 30).start("echo")
    t0 = time.monotonic()
    try:
        load.wait_for_ok(100)
        for _ in range(rounds):
            time.sleep(0.2)
            rig.kill(2)
            rig.steer([0, 1])                     # the master reaps it: slot 2 is in back-off
            time.sleep(backoff)                   # the scenario: the back-off delay
            rig.spawn(2)
            rig.steer([0, 1, 2])
    finally:
        took = time.monotonic() - t0
        result = load.stop()
        rig.close()
    return summary(result, took)


def summary(result: Result, took: float) -> dict[str, float]:
    """Return the outcome counts, round trips per second and the slowest round trip (ms)."""
    slowest = max(result.latencies, default=0.0)
    stalled = sum(1 for t in result.latencies if t > STALL)
    return {"ok": result.ok, "rate": result.ok / took, "max_ms": slowest * 1000, "stalled": stalled,
            **result.failures}


def table(runs: dict[tuple[str, bool], list[dict[str, float]]]) -> str:
    cols = (f"{'scenario':<8} {'steering':<8} {'resets':>6} {'other':>5} {'trips/s':>8} "
            f"{'stalled':>7} {'slowest ms':>10}")
    lines = [cols, "-" * len(cols)]
    for (name, steer), results in runs.items():
        def med(f: Callable[[dict[str, float]], float]) -> float:
            return statistics.median(f(r) for r in results)
        resets = med(lambda r: r.get("reset", 0))
        other = med(lambda r: sum(v for k, v in r.items() if k not in NOT_FAILURES))
        lines.append(f"{name:<8} {'on' if steer else 'off':<8} {resets:>6g} {other:>5g} "
                     f"{med(lambda r: r['rate']):>8.0f} {med(lambda r: r['stalled']):>7g} "
                     f"{med(lambda r: r['max_ms']):>10.0f}")
    return "\n".join(lines)


def cost(slots: int = 16, n: int = 2000) -> str:
    """Return the median time of a steer() that changes nothing, and of one that re-attaches."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = schema.parse(f"listeners:\n  - {{name: web, host: 127.0.0.1, port: {port}}}\n"
                       f"workers: {{count: {slots}, app: echo}}\n")
    ls = ListenerSet()
    ls.ensure(cfg)

    def flip() -> None:
        ls.steer(cfg, range(slots - 1))
        ls.steer(cfg, range(slots))

    try:
        same = statistics.median(timeit.repeat(lambda: ls.steer(cfg, range(slots)), number=n, repeat=5))
        both = statistics.median(timeit.repeat(flip, number=n, repeat=5))
    finally:
        ls.close_all()
    return (f"steer() with {slots} slots: {same / n * 1e6:.1f} us when nothing changed, "
            f"{both / (2 * n) * 1e6:.1f} us when it re-attaches")


def inner(args: argparse.Namespace) -> int:
    if os.readlink("/proc/self/ns/net") == os.environ.get("HOST_NETNS", ""):
        print("refusing to run in the caller's network namespace", file=sys.stderr)
        return 2
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    Path(MIGRATE_REQ).write_text("0\n")
    runs: dict[tuple[str, bool], list[dict[str, float]]] = {}
    for rep in range(args.repeats):
        # Alternate the order, so neither mode always runs on a warmer machine.
        for steer in ((False, True) if rep % 2 == 0 else (True, False)):
            runs.setdefault(("grow", steer), []).append(failing_grow(steer, args.rounds, args.hold))
            runs.setdefault(("ttou", steer), []).append(ttou(steer, args.rounds))
            runs.setdefault(("crash", steer), []).append(crash(steer, args.rounds, args.backoff))
    ordered = {k: runs[k] for k in sorted(runs, key=lambda k: (["grow", "ttou", "crash"].index(k[0]), k[1]))}
    print(f"tcp_migrate_req=0 in a private network namespace; {args.repeats} repeats x "
          f"{args.rounds} rounds; median per run; hold {args.hold}s, back-off {args.backoff}s")
    print(table(ordered))
    print(cost())
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--hold", type=float, default=0.5)
    ap.add_argument("--backoff", type=float, default=1.0)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--acceptor", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.acceptor is not None:
        acceptor(args.acceptor)
        return 0
    if args.inner:
        return inner(args)
    if os.geteuid() != 0:
        print("bench/steering.py needs root, for `unshare -n`", file=sys.stderr)
        return 2
    env = {**os.environ, "HOST_NETNS": os.readlink("/proc/self/ns/net")}
    cmd = ["unshare", "-n", sys.executable, __file__, "--inner", "--repeats", str(args.repeats),
           "--rounds", str(args.rounds), "--hold", str(args.hold), "--backoff", str(args.backoff)]
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
