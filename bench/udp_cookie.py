"""Benchmark: flow-sticky UDP (`flows: cookie`) across 20 reloads, counted per flow.

The real daemon runs config/examples/flow_cookie.{yaml,py} (each generation takes
sockets of a pool; a datagram that starts with a worker's 4-byte cookie goes to that
worker while its generation holds the socket). The client:

- starts `--per-gen` new flows each time a generation becomes ACTIVE (after
  every HUP, which the bench sends `--interval` s after the previous reload is
  done). Most flows live `--life` seconds; the first flow of each generation
  lives to the end of the run, longer than `--drain-timeout`, so its
  generation's worker is SIGKILLed at the drain deadline and the flow moves;
- each flow is closed-loop: one datagram `COOKIE FLOW SEQ PAYLOAD` in flight,
  starting with 4 zero bytes, then the last cookie it got back; an answer not
  back within `--timeout` is lost (an answer that comes later is counted late).

Every change of a flow's cookie is a move: the flow was answered by a worker
other than the one whose cookie it carried. A move is legitimate only once
that worker's socket went back to the pool (the master logs `listener ...
(udp/cookie@G, slot S): its socket #N is back in the pool`); one before that, i.e. while the generation still
served the flow, is a violation. A lost datagram is put down to the drain
deadline when it was sent to a worker in the `--timeout` before that worker's
SIGKILL was logged, or after it, and before its socket went back to the pool.

    .venv/bin/python -m bench.udp_cookie [--repeats 3] [--hups 20] [--interval 1]

Prints a table of medians over the repeats. The machine is shared and noisy (2
cores): the counts matter (they must be 0 where marked), not the rates.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from bench.udp import free_udp_port
from tests.support import ROOT
from tests.support.upgraderd_proc import Daemon, wait_until

NEW_FLOW = b"\0\0\0\0"
PAYLOAD = b"y" * 32
CLOSED = re.compile(r"^(\S+) .*listener \S+ \(udp/cookie@(\d+), slot (\d+)\): its socket #\d+ is back in the pool",
                    re.M)
KILLED = re.compile(r"^(\S+) .*generation (\d+) slot (\d+): pid \d+ still running after drain timeout", re.M)


@dataclass
class Flow:
    """One closed-loop flow; only its own thread writes it until it is joined."""

    number: int
    life: float
    sent: int = 0
    answered: int = 0
    late: int = 0
    lost: list[tuple[float, bytes]] = field(default_factory=list)      # (send time, cookie sent)
    moves: list[tuple[float, bytes, bytes]] = field(default_factory=list)  # (time, from, to)
    first: bytes = b""                                                # cookie of the first answer
    thread: threading.Thread | None = None


def gen_slot(cookie: bytes) -> tuple[int, int]:
    g, s = struct.unpack(">HH", cookie)
    return int(g), int(s)


def run_flow(flow: Flow, port: int, timeout: float, stop: threading.Event, cap: int) -> None:
    """Send until `flow.life` has passed, `stop` is set or `cap` datagrams are sent."""
    end = time.monotonic() + flow.life
    cookie = NEW_FLOW
    lost_seqs: set[int] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.1", port))
        for seq in range(cap):
            if stop.is_set() or time.monotonic() >= end:
                return
            head = b"%d %d " % (flow.number, seq)
            sent_at = time.time()
            s.send(cookie + head + PAYLOAD)
            flow.sent += 1
            reply = None
            deadline = time.monotonic() + timeout
            while reply is None and (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    got = s.recv(65536)
                except (socket.timeout, ConnectionRefusedError):
                    break
                if got[4:] == head + PAYLOAD:
                    reply = got
                    continue
                m = re.match(rb"(\d+) (\d+) ", got[4:])
                if m is not None and int(m.group(2)) in lost_seqs:
                    lost_seqs.discard(int(m.group(2)))
                    flow.late += 1
            if reply is None:
                flow.lost.append((sent_at, cookie))
                lost_seqs.add(seq)
                continue
            flow.answered += 1
            new = reply[:4]
            if cookie == NEW_FLOW:
                flow.first = new
            elif new != cookie:
                flow.moves.append((time.time(), cookie, new))
            cookie = new


def stamps(pattern: re.Pattern[str], log: str) -> dict[tuple[int, int], float]:
    """Return (generation, slot) -> wall time of the first log line matching `pattern`."""
    out: dict[tuple[int, int], float] = {}
    for m in pattern.finditer(log):
        out.setdefault((int(m.group(2)), int(m.group(3))), datetime.fromisoformat(m.group(1)).timestamp())
    return out


def config(port: int, args: argparse.Namespace) -> dict[str, object]:
    cfg = yaml.safe_load((ROOT / "config" / "examples" / "flow_cookie.yaml").read_text())
    cfg["listeners"][0]["port"] = port
    cfg["workers"]["command"] = [sys.executable, "config/examples/flow_cookie.py"]
    cfg["ready"]["timeout"] = "10s"
    cfg["drain"]["timeout"] = f"{args.drain_timeout:g}s"
    return dict(cfg)


def run_once(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    port = free_udp_port()
    stop = threading.Event()
    flows: list[Flow] = []

    def start_flows() -> None:
        for i in range(args.per_gen):
            f = Flow(len(flows), life=3600.0 if i == 0 else args.life)
            f.thread = threading.Thread(target=run_flow, args=(f, port, args.timeout, stop, 2_000_000),
                                        name=f"flow-{f.number}", daemon=True)
            flows.append(f)
            f.thread.start()

    with Daemon(workdir, config(port, args)) as d:
        d.start()
        try:
            start_flows()
            wait_until(lambda: all(f.answered >= 10 for f in flows), 20, "the first flows' answers")
            for gen in range(2, args.hups + 2):
                d.reload_to(gen)
                start_flows()
                time.sleep(args.interval)   # the bench's schedule: a HUP `interval` s after each reload
        finally:
            stop.set()
            end = time.monotonic() + 15
            for f in flows:
                assert f.thread is not None
                f.thread.join(max(0.0, end - time.monotonic()))
                assert not f.thread.is_alive(), f"flow {f.number} did not stop"
        log = d.log()
        d.stop()
    closed, killed = stamps(CLOSED, log), stamps(KILLED, log)
    early = early_same = near_close = moved_flows = lost_at_kill = 0
    gaps: list[float] = []
    for f in flows:
        bad = 0
        for t, old, new in f.moves:
            close = closed.get(gen_slot(old))
            if close is None or t < close:
                bad += 1
                same = gen_slot(old)[0] == gen_slot(new)[0]
                early += not same
                early_same += same
                # The master logs a close a little after it; the move's answer comes a little after it too.
                near = min((abs(t - c) for c in closed.values()), default=float("inf"))
                near_close += near < args.near
                if args.verbose:
                    print(f"  early move: flow {f.number} {gen_slot(old)} -> {gen_slot(new)} at {t:.3f}; "
                          f"its socket went back to the pool at {close}; nearest return of another {near * 1000:.0f} ms away",
                          file=sys.stderr)
            else:
                gaps.append(t - close)
        moved_flows += bool(f.moves) and not bad
        for t, c in f.lost:
            key = gen_slot(c) if c != NEW_FLOW else None
            kill = killed.get(key) if key is not None else None
            if kill is not None and kill - args.timeout <= t <= closed.get(key, float("inf")):  # type: ignore[arg-type]
                lost_at_kill += 1
    if args.verbose and early + early_same:
        print("\n".join(line for line in log.splitlines() if "TRACE" not in line), file=sys.stderr)
    return {
        "flows": len(flows),
        "sent": sum(f.sent for f in flows),
        "early": early,
        "early_same": early_same,
        "near_close": near_close,
        "lost": sum(len(f.lost) for f in flows),
        "lost_at_kill": lost_at_kill,
        "moved": moved_flows,
        "moves": sum(len(f.moves) for f in flows),
        "killed": len(killed),
        "late": sum(f.late for f in flows),
        "gap_ms": 1000 * min(gaps) if gaps else float("nan"),
    }


COLUMNS = [
    ("flows", "flows"),
    ("sent", "datagrams sent"),
    ("early", "moved to another generation while the flow's worker was alive (must be 0)"),
    ("early_same", "moved to another worker of the same generation while its own was alive"),
    ("near_close", "of these early moves: within --near s of another socket going back to the pool"),
    ("lost", "lost (never answered)"),
    ("lost_at_kill", "of which at a drain-timeout SIGKILL"),
    ("moved", "flows that moved, all after their worker's socket went back to the pool"),
    ("moves", "moves"),
    ("killed", "workers SIGKILLed at drain.timeout"),
    ("late", "answered late (not lost)"),
    ("gap_ms", "smallest time from a socket's return to the pool to a move off it (ms)"),
]


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.udp_cookie", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hups", type=int, default=20)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between a reload's end and the next HUP")
    p.add_argument("--per-gen", type=int, default=3, help="flows started with each generation")
    p.add_argument("--life", type=float, default=2.5, help="seconds a flow lives (but the first of each generation)")
    p.add_argument("--drain-timeout", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=1.0, help="a datagram not answered by then is lost")
    p.add_argument("--near", type=float, default=0.1, help="seconds around a socket close (for early moves)")
    p.add_argument("--verbose", action="store_true", help="print each early move, and the master's log then")
    args = p.parse_args()
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-udp-cookie-") as tmp:
        for r in range(args.repeats):
            workdir = Path(tmp) / f"run-{r}"
            workdir.mkdir()
            runs.append(run_once(args, workdir))
            print(f"  repeat {r + 1}: {runs[-1]}", file=sys.stderr, flush=True)
    print(f"{args.hups} HUPs {args.interval:g} s after each reload, {args.per_gen} new flows per generation "
          f"(one to the end, the others {args.life:g} s), drain.timeout {args.drain_timeout:g} s, "
          f"timeout {args.timeout:g} s, 2 workers; median of {args.repeats} (2 shared cores, noisy)")
    print("| measure | median | each repeat |")
    print("|---|---|---|")
    for key, title in COLUMNS:
        vals = [x[key] for x in runs]
        print(f"| {title} | {statistics.median(vals):.0f} | {', '.join(f'{v:.0f}' for v in vals)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
