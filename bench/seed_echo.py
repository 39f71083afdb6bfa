"""Benchmark: echo throughput of upgraderd's built-in echo app against the seed's C++ server.

The reference is bench/seed_echo_server.cpp, written in the design of the
seed's SO_REUSEPORT example: N processes, each with its own SO_REUSEPORT
listener and an epoll loop, echoing. upgraderd runs the shape of its default
config, config/upgraderd.yaml (4 echo workers forked from a warm template,
reuseport listener, backlog 1024, hand-off on, metrics on); `--exec` runs
exec'd workers instead (`prefork: false`).
Both are driven by the same C client (bench/echo_client.c), in one run:
- keepalive: T threads, each one connection doing 64-byte write/read round trips;
- connect: T threads, each round trip on a new connection (connect, write,
  read, close).
The bench compiles both C/C++ sources with g++/gcc into a temp dir, starts
every server once, then measures each (server, mode) pair for `--seconds`
after a short warm-up, interleaved over `--repeats` rounds, so machine noise
falls on all of them alike. It prints the median round trips per second, the
errors (any failed or wrong round trip, summed over the repeats), the
server's CPU time per round trip (user + system of its whole process tree,
from /proc, over the client's run: less sensitive to other load on the
machine than the rate), and the ratio upgraderd / C++ of the medians, plus
the median of the per-round ratios (the pair measured back to back).

Every server runs in a session of its own (setsid), as a daemon does, and the
client in the bench's: with autogroup scheduling (sched_autogroup_enabled, on
here) a session is a scheduling group, and the CPU share of a server that
shares the client's group differs from one that does not. `--same-session`
runs the servers in the client's session instead. The two give different
ratios (docs/workers.md, section 11): compare servers only in one setting.

With keep-alive, one set of T connections is one spread over the server's
processes (SO_REUSEPORT places a connection by a hash of its ports), and the
rate of every server swings 2-3x from one spread to the next. `--respread S`
replaces each client connection after S seconds (staggered over the threads),
so that a round's rate is an average over many spreads; 0 (the default) keeps
them for the round, as earlier figures were taken.

`--tree NAME=PATH` adds an upgraderd from another checkout (e.g. main) to
the same run, for before/after figures: its master and workers run with that
directory as working directory, first on sys.path.

    .venv/bin/python -m bench.seed_echo [--repeats 5] [--seconds 3] [--threads 8]
    .venv/bin/python -m bench.seed_echo --tree main=/work/main
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from tests.support import ROOT
from tests.support.upgraderd_proc import Daemon, children, echo_config, free_port, wait_until

HERE = Path(__file__).resolve().parent
MODES = ("keepalive", "connect")
REFERENCE = "c++ reuseport"


def tree_cpu(root: int) -> float:
    """Return the user + system CPU seconds of `root` and all its descendants alive now."""
    total, todo, seen = 0.0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        todo.extend(children(pid))
    return total


def build(out: Path) -> tuple[Path, Path]:
    """Compile the reference server and the client into `out`; return their paths."""
    server, client = out / "seed_echo_server", out / "echo_client"
    for cmd in (["g++", "-O2", "-std=c++17", "-o", str(server), str(HERE / "seed_echo_server.cpp")],
                ["gcc", "-O2", "-pthread", "-o", str(client), str(HERE / "echo_client.c")]):
        subprocess.run(cmd, check=True)
    return server, client


def listening(port: int) -> bool:
    """Return True if something accepts on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Reference:
    """The C++ reuseport echo server, started once for the whole run and stopped by its pid."""

    def __init__(self, binary: Path, workers: int, new_session: bool) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([str(binary), "127.0.0.1", str(self.port), str(workers), "1024"],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     start_new_session=new_session)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("ready"):
            self.stop()
            raise SystemExit(f"the reference server did not start: {line!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # its workers die with it (PR_SET_PDEATHSIG)
                self.proc.wait()


def start_upgraderd(stack: ExitStack, tmp: Path, name: str, tree: Path, workers: int,
                    prefork: bool, new_session: bool) -> tuple[int, int]:
    """Start an upgraderd of `tree` with its default config shape; return its port and master pid."""
    port = free_port()
    workdir = tmp / name.replace("/", "_")
    workdir.mkdir()
    cfg = echo_config(port, workers={"count": workers, "app": "echo", "prefork": prefork, "warm": prefork})
    d = Daemon(workdir, cfg, cwd=tree, new_session=new_session)
    stack.enter_context(d.start())
    wait_until(lambda: listening(port), 10, f"{name} listening")
    return port, d.pid


def measure(client: Path, port: int, server_pid: int, mode: str, threads: int, warmup: float, seconds: float,
            size: int, respread: float = 0.0) -> tuple[float, int, float]:
    """Run the client once; return (round trips per second, errors, server CPU microseconds per round trip)."""
    cpu0 = tree_cpu(server_pid)
    out = subprocess.run([str(client), "127.0.0.1", str(port), str(threads), str(warmup), str(seconds), mode,
                          str(size), str(respread)],
                         capture_output=True, text=True, timeout=warmup + seconds + 30, check=True)
    cpu = tree_cpu(server_pid) - cpu0
    fields = out.stdout.split()
    values = dict(zip(fields[::2], fields[1::2]))
    errors = int(values["errors"]) + int(values["connect_errors"])
    return (int(values["round_trips"]) / float(values["seconds"]), errors,
            cpu * 1e6 / max(1, int(values["all_round_trips"])))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per (server, mode, repeat)")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=8, help="client threads (connections at once)")
    ap.add_argument("--workers", type=int, default=4, help="server processes, both servers")
    ap.add_argument("--size", type=int, default=64, help="message size in bytes")
    ap.add_argument("--respread", type=float, default=0.0, metavar="SECONDS",
                    help="keepalive: each client connection is replaced after SECONDS (0: kept for the round)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--exec", action="store_true", help="exec'd workers (prefork: false), not the default's")
    ap.add_argument("--same-session", action="store_true",
                    help="run the servers in the client's session (one autogroup), not each in its own")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                    help="also measure the upgraderd of another checkout")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes) or not modes:
        ap.error(f"--modes takes {', '.join(MODES)}")
    for tool in ("g++", "gcc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"error: {tool} is needed to build the reference server and the client")
    trees = {"upgraderd": ROOT}
    for spec in args.tree:
        name, sep, path = spec.partition("=")
        if not sep or not (Path(path) / "upgraderd" / "__init__.py").is_file():
            ap.error(f"--tree {spec!r}: expected NAME=PATH of an upgraderd checkout")
        trees[f"upgraderd {name}"] = Path(path).resolve()

    rates: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], int] = {}
    with tempfile.TemporaryDirectory(prefix="seed_echo.") as tmpdir, ExitStack() as stack:
        tmp = Path(tmpdir)
        server_bin, client = build(tmp)
        ref = Reference(server_bin, args.workers, not args.same_session)
        stack.callback(ref.stop)
        ports = {REFERENCE: (ref.port, ref.proc.pid)}
        for name, tree in trees.items():
            ports[name] = start_upgraderd(stack, tmp, name, tree, args.workers, not args.exec,
                                          not args.same_session)
        started = time.monotonic()
        for r in range(args.repeats):
            for mode in modes:
                # Alternate the order, so neither server always goes first after a switch.
                order = list(ports) if r % 2 == 0 else list(reversed(ports))
                for name in order:
                    rate, errs, cpu = measure(client, *ports[name], mode, args.threads, args.warmup,
                                              args.seconds, args.size, args.respread)
                    rates.setdefault((name, mode), []).append(rate)
                    cpus.setdefault((name, mode), []).append(cpu)
                    errors[(name, mode)] = errors.get((name, mode), 0) + errs
            print(f"repeat {r + 1}/{args.repeats} done ({time.monotonic() - started:.0f} s)", file=sys.stderr,
                  flush=True)

    respread = f"keep-alive connections replaced every {args.respread:g} s; " if args.respread else ""
    session = "in the client's session" if args.same_session else "each in its own session"
    print(f"\necho round trips/s, {args.size}-byte messages, {args.threads} client threads, "
          f"{args.workers} server processes ({'exec' if args.exec else 'prefork, warm'}; {respread}{session}); "
          f"median of {args.repeats} x {args.seconds:g} s; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print(f"| server | {' | '.join(f'{m} rt/s' for m in modes)} | "
          f"{' | '.join(f'{m} server CPU us/rt' for m in modes)} | {' | '.join(f'{m} errors' for m in modes)} |")
    print("|---|" + "---|" * (3 * len(modes)))
    for name in ports:
        med = [f"{statistics.median(rates[(name, m)]):,.0f}" for m in modes]
        cpu_cells = [f"{statistics.median(cpus[(name, m)]):.1f}" for m in modes]
        err_cells = [str(errors[(name, m)]) for m in modes]
        print(f"| {name} | {' | '.join(med)} | {' | '.join(cpu_cells)} | {' | '.join(err_cells)} |")
    print("\nratio to the C++ reference (median of medians; median of per-round ratios, min-max):\n")
    print(f"| server | {' | '.join(modes)} |")
    print("|---|" + "---|" * len(modes))
    for name in ports:
        if name == REFERENCE:
            continue
        cells = []
        for m in modes:
            ours, ref_rates = rates[(name, m)], rates[(REFERENCE, m)]
            per_round = [a / b for a, b in zip(ours, ref_rates)]
            cells.append(f"{statistics.median(ours) / statistics.median(ref_rates):.2f}x "
                         f"({statistics.median(per_round):.2f}, {min(per_round):.2f}-{max(per_round):.2f})")
        print(f"| {name} | {' | '.join(cells)} |")
    print("\nserver CPU per round trip, upgraderd / C++ (medians): " + ", ".join(
        f"{name} {m} {statistics.median(cpus[(name, m)]) / statistics.median(cpus[(REFERENCE, m)]):.2f}x"
        for name in ports if name != REFERENCE for m in modes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
