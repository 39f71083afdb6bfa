"""Benchmark: forking a generation's workers serially (one middle process) or from several middles.

A prefork template (apps/template.py) forks every worker of a batch from one
short-lived middle process, one after another. This measures that fork phase
in a process set up as a template is (the echo app and the worker library
imported, gc frozen), against k middles forking N/k workers each at once:

    .venv/bin/python -m bench.scale_fork [--counts 32 128 256] [--middles 1 2 4] [--repeats 5]

Each forked child blocks on a gate, as a worker does until its SPAWNED went
out, so only the forks are timed (from the first fork of the first middle
to the last middle's report); then the gate opens, the children exit and are
reaped. It prints the median wall time of the fork phase, per worker, the
speed-up over one middle, and the middles' CPU time per fork (which the
machine's load hardly changes), and the CPU count: what k middles can gain is
bounded by the cores (here 2) and by the per-fork cost, which is mostly the
copy of the template's page tables.

`--floor N` prints instead the least a generation of N forked Python workers
can take here: one middle forks N gated children, as a template does; once all
are forked the gate opens and each child sends one datagram (its READY=1) and
waits, as a worker serves on (they exit after the timing); timed from the first
fork to the last datagram, median of --repeats.
No worker set-up, no master: bench.scale prints it beside HUP -> ACTIVE.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import socket
import statistics
import time

from upgraderd.apps import template


def fork_phase(count: int, middles: int) -> tuple[float, float]:
    """Fork `count` gated children from `middles` middle processes; return the fork phase's
    wall seconds and the CPU seconds the middles spent forking (load-independent)."""
    gate_r, gate_w = os.pipe()
    done_r, done_w = os.pipe()
    shares = [count // middles + (1 if i < count % middles else 0) for i in range(middles)]
    t0 = time.perf_counter()
    pids = []
    for share in shares:
        middle = os.fork()
        if middle == 0:
            try:
                os.close(gate_w)
                cpu = time.process_time()
                for _ in range(share):
                    if os.fork() == 0:
                        os.read(gate_r, 1)
                        os._exit(0)
                os.write(done_w, f"{time.process_time() - cpu:.9f}\n".encode())
            finally:
                os._exit(0)
        pids.append(middle)
    reports = b""
    while reports.count(b"\n") < middles:
        reports += os.read(done_r, 4096)
    took = time.perf_counter() - t0
    cpu = sum(float(x) for x in reports.split())
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(gate_w)   # EOF opens every gate; the children (re-parented to init, or to us) exit
    os.close(gate_r)
    os.close(done_r)
    os.close(done_w)
    return took, cpu


def floor(count: int) -> float:
    """Return the wall seconds from the first fork of `count` gated children to their last READY."""
    gate_r, gate_w = os.pipe()
    done_r, done_w = os.pipe()
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    t0 = time.perf_counter()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(gate_w)
            os.close(done_w)
            rx.close()
            for _ in range(count):
                if os.fork() == 0:
                    if os.read(gate_r, 1) == b"1":
                        tx.send(b"READY=1")
                        os.read(done_r, 1)   # serving, until the timing is done (EOF)
                    os._exit(0)
        finally:
            os._exit(0)
    os.waitpid(middle, 0)
    os.close(done_r)
    os.write(gate_w, b"1" * count)
    os.close(gate_w)   # and a child that finds no byte reads EOF and exits
    os.close(gate_r)
    tx.close()
    rx.settimeout(30)   # bounded: a child that never reports ends the run with an error
    try:
        for _ in range(count):
            rx.recv(64)
        took = time.perf_counter() - t0
    finally:
        os.close(done_w)   # EOF: every child exits, re-parented to us (a subreaper), and is reaped
        rx.close()
        for _ in range(count):
            os.waitpid(-1, 0)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--middles", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--floor", type=int, metavar="N")
    args = ap.parse_args()
    template.preload()
    template.load("echo")   # what a template imports before it forks
    gc.disable()
    gc.freeze()
    if args.floor:
        # The forked children are re-parented to this process when their middle exits, so that
        # each repeat reaps them before the next starts (PR_SET_CHILD_SUBREAPER).
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
        print(f"{statistics.median(floor(args.floor) for _ in range(args.repeats)) * 1e3:.1f}")
        return
    rss = int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])
    print(f"template-like process: RSS {rss / 1024:.0f} MB, {os.cpu_count()} CPUs")
    print(f"{'workers':>7} {'middles':>7} {'fork phase':>11} {'per worker':>11} {'speed-up':>8} "
          f"{'CPU per fork':>12}")
    for count in args.counts:
        base = 0.0
        for k in args.middles:
            runs = [fork_phase(count, k) for _ in range(args.repeats)]
            took = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            base = base or took
            print(f"{count:>7} {k:>7} {took * 1e3:>8.1f} ms {took / count * 1e6:>8.0f} us {base / took:>7.2f}x "
                  f"{cpu / count * 1e6:>9.0f} us", flush=True)


if __name__ == "__main__":
    main()
