"""Soak: many reloads under load; prove nothing leaks and nothing is lost.

    .venv/bin/python -m bench.soak [--reloads 1000] [--every 100] [--load echo] [--persistent 8]
                                   [--prefork [--cold]] [--max-seconds S]

The master runs the default echo service (4 workers) under client load. It is
sent HUP after HUP; each reload is waited for until the master's status file
shows the successor ACTIVE and the old generation RETIRED (one generation
left), so every reload drains a generation completely before the next one
starts. Every `--every` reloads the table gets a row of the master's fd
count, RSS and threads, and the total fd count of the workers. The run fails
(exit 1) if any round trip failed, if a reload failed, if the master's fds or
threads at the end differ from the first row, if its RSS grew by more than
`--rss-slack` MB, or if the workers' fds moved by more than the client
connections that can be open.

With `--persistent N`, N more clients each hold one echo connection for the
whole run, never reconnected (tests/support/persistent.py): an echo stream
never goes idle, so every reload must hand each of them off to the new
generation (`drain.handoff: auto`, the default): a stream that stayed behind
would hold its old worker until drain.timeout and then be cut. Each reload is
checked for a hand-off: the old generation's workers log `handed X of Y` before
they exit, and the soak reads the master's log from where it last stopped
(never the whole log again: at 10,000 reloads it is tens of MB), so a reload
whose generation handed nothing over is counted and fails the run. The run
also fails if a persistent connection failed or changed its local port, if
any worker was SIGKILLed at its drain deadline, or if fewer than N x reloads
connections were counted as handed off in /metrics (the load's own short
connections, caught in flight at a drain, are handed off too, so the count
may be higher). The table adds the workers' total RSS, for the hand-off's memory.

Where a reload's time goes: with exec'd workers each reload starts 4 Python
interpreters (about 0.35 s of wall time each on a loaded 2-core machine); with
`--prefork` one template is exec'd and forks the 4 workers. `--cold` turns the
warm standby off: the standby starts STANDBY_DELAY (0.3 s) after a generation
is ACTIVE, so back-to-back reloads that do not wait for it find none ready and
pay a fresh template anyway, plus a standby started and stopped for nothing.
The drain itself is the hand-off (tens of ms), so `drain.timeout` (5 s here)
only bounds a failure. Measured during the 10,000-reload run (--prefork --cold,
1 client thread, 8 persistent clients 0.05 s apart): the master used 0.02 s
of CPU per reload and its children (the template, and the 4 workers serving
the load for their generation's life) 0.29 s, from /proc/PID/stat of the
master (its utime and stime, and the cutime and cstime of what it reaped); the
wall time was 2.4-2.9 s per reload at nice 10 on 2 shared cores at load
average 50-90, where a reload is waiting for CPU, not for the daemon.

`--max-seconds` bounds the run: once it has passed, no new reload starts and
the table and verdict cover the reloads done. CI runs a small sample
(tests/e2e/test_soak.py); the issue's 1,000 and 10,000-reload figures come
from running this by hand.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.loadgen import Load
from tests.support.persistent import StreamResult, Streams
from tests.support.scrape import scrape, value
from tests.support.upgraderd_proc import Daemon, echo_config, free_port, wait_until

# The line each draining built-in worker logs (apps/moves.py) once it has given what it could.
HANDED = re.compile(r"worker generation (\d+) slot \d+: handed (\d+) of (\d+) connection")


@dataclass(frozen=True)
class Sample:
    """Resource use of the master and its workers after `reloads` reloads."""

    reloads: int
    master_fds: int
    master_rss_mb: float
    master_threads: int
    workers: int
    worker_fds: int
    worker_rss_mb: float = 0.0
    elapsed: float = 0.0
    handed: int = 0


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise KeyError(name)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_mb(pid: int) -> float:
    return int(_status_field(pid, "VmRSS").split()[0]) / 1024


class LogTail:
    """The master's log, read from where the previous read stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.rest = b""

    def lines(self) -> list[str]:
        """Return the whole lines written since the last call."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *whole, self.rest = (self.rest + data).split(b"\n")
        return [x.decode(errors="replace") for x in whole]


@dataclass
class Reloads:
    """What the reloads did: how many, which failed, and the hand-offs each old generation logged."""

    done: int = 0
    failed: list[str] = field(default_factory=list)
    handed: Counter[int] = field(default_factory=Counter)      # generation -> connections handed
    held: Counter[int] = field(default_factory=Counter)        # generation -> connections held at drain
    without_handoff: list[int] = field(default_factory=list)   # old generations that handed nothing

    def read_log(self, tail: LogTail) -> None:
        for line in tail.lines():
            m = HANDED.search(line)
            if m:
                self.handed[int(m[1])] += int(m[2])
                self.held[int(m[1])] += int(m[3])


def reload_once(d: Daemon, tail: LogTail, out: Reloads) -> None:
    """HUP the master; return once its successor is ACTIVE and the old generation RETIRED."""
    before: dict[str, Any] = wait_until(d.status, 10, "the status file")  # type: ignore[assignment]
    hups, old = before["hups"], max(g["number"] for g in before["generations"] if g["state"] == "ACTIVE")
    os.kill(d.pid, signal.SIGHUP)

    def done() -> dict[str, Any] | None:
        st = d.status()
        if st is None or st["last_reload"]["covers"] <= hups:
            return None
        if st["last_reload"]["result"] != "success":
            return st
        gens = st["generations"]
        return st if len(gens) == 1 and gens[0]["state"] == "ACTIVE" and gens[0]["number"] > old else None
    what = f"reload {out.done + 1}: the successor ACTIVE and generation {old} retired"
    try:
        st: dict[str, Any] = wait_until(done, 60, what, interval=0.005)  # type: ignore[assignment]
    except AssertionError:
        # Slow is a finding, not the end of the run: say what the master was doing, then wait on.
        tail_text = d.log()[-4000:]
        out.failed.append(f"{what}: not within 60 s")
        print(f"SLOW: {what}: not within 60 s; the master's log ends:\n{tail_text}", file=sys.stderr, flush=True)
        st = wait_until(done, 300, what, interval=0.05)  # type: ignore[assignment]
    out.done += 1
    if st["last_reload"]["result"] != "success":
        out.failed.append(f"reload {out.done}: {st['last_reload']}")
        return  # the old generation serves on: nothing to hand off
    # The old workers log their hand-off before they exit, and the generation retired once the
    # master reaped the last of them: the lines are in the file by now.
    out.read_log(tail)
    if out.handed[old] == 0:
        out.without_handoff.append(old)


def sample(d: Daemon, reloads: int, count: int, children: int, started: float, handed: int) -> Sample:
    """Measure once only the ACTIVE generation is left and the master's children are its workers.

    `children` counts the template and the standby too: between a reload and
    the standby's start the master holds one control socket fewer.
    """
    def one_generation() -> set[int] | None:
        st = d.status()
        if st is None or len(st["generations"]) != 1:
            return None
        # From the status file, not the master's children: a template and a standby are children too.
        workers = {w["pid"] for w in st["generations"][0]["workers"] if w["pid"] is not None}
        live = d.workers()
        return workers if len(workers) == count and workers <= live and len(live) == children else None
    workers: set[int] = wait_until(one_generation, 60, "the old generations to retire")  # type: ignore[assignment]
    return Sample(reloads, _fds(d.pid), _rss_mb(d.pid), int(_status_field(d.pid, "Threads")), len(workers),
                  _steady_fds(workers), sum(_rss_mb(p) for p in workers), time.monotonic() - started, handed)


def _steady_fds(workers: set[int], reads: int = 10, interval: float = 0.02) -> int:
    """Return the workers' fewest total fds over `reads` reads: a leaked fd is in every read.

    Under load a worker also holds the connections in flight, and those whose
    client has closed but whose end of file it has not read yet: more than one
    per client thread at times (7 over 4 clients was seen), never the same ones
    for long.
    """
    counts = []
    for i in range(reads):
        if i:
            time.sleep(interval)
        counts.append(sum(_fds(p) for p in workers))
    return min(counts)


@dataclass
class Outcome:
    """What the clients saw, and how many connections the master counted as handed off."""

    load: Load
    reloads: Reloads
    streams: StreamResult | None = None
    handed_off: float = 0.0
    drain_timeouts: float = 0.0


@dataclass(frozen=True)
class Plan:
    """What to run: the reloads, the load and the workers."""

    reloads: int
    every: int = 100
    load: str = "echo"
    threads: int = 4
    count: int = 4
    prefork: bool = False
    warm: bool = True
    persistent: int = 0
    max_seconds: float = 0.0     # 0: no bound but the reloads
    pause: float = 0.005         # between a persistent client's round trips
    timeout: float = 5.0         # a client's wait for an answer before it counts a failure


def _config(plan: Plan, port: int) -> dict[str, object]:
    # A generous ready timeout: on a shared machine a starved template can take seconds, and a
    # reload that fails on it would measure the machine, not the hand-off.
    cfg = echo_config(port, count=plan.count, drain={"timeout": "5s"}, ready={"timeout": "30s"})
    if plan.prefork:
        cfg["workers"] = {"count": plan.count, "app": "echo", "prefork": True, "warm": plan.warm}
    return cfg


def run(plan: Plan, workdir: Path, report: Any = None) -> tuple[list[Sample], Outcome]:
    """Reload `plan.reloads` times under load; return the samples and what the clients saw.

    `report(sample)` is called with each row as it is measured (a long run shows its progress).
    """
    port = free_port()
    samples: list[Sample] = []
    cfg = _config(plan, port)
    children = plan.count + (1 + plan.warm if plan.prefork else 0)
    started = time.monotonic()
    deadline = started + plan.max_seconds if plan.max_seconds else float("inf")
    seconds = min(plan.reloads * 5 + 60, plan.max_seconds + 120 if plan.max_seconds else float("inf"))
    with Daemon(workdir, cfg).start() as d:
        load = Load("127.0.0.1", port, threads=plan.threads, max_seconds=seconds, max_per_thread=10**9,
                    timeout=plan.timeout).start(plan.load)
        streams = (Streams(port, plan.persistent, max_seconds=seconds, pause=plan.pause, timeout=plan.timeout).start()
                   if plan.persistent else None)
        if not load.wait_for_ok(50) or (streams is not None and not streams.wait_ok(10 * plan.persistent)):
            raise SystemExit("no load got through before the first reload")
        tail, out = LogTail(d.log_path), Outcome(load, Reloads())
        started = time.monotonic()   # the rows' seconds count from the first HUP
        while out.reloads.done < plan.reloads and time.monotonic() < deadline:
            reload_once(d, tail, out.reloads)
            n = out.reloads.done
            if n == 1 or n % plan.every == 0 or n == plan.reloads:
                samples.append(sample(d, n, plan.count, children, started, sum(out.reloads.handed.values())))
                if report is not None:
                    report(samples[-1])
        if samples[-1].reloads != out.reloads.done:   # stopped by the deadline between two rows
            samples.append(sample(d, out.reloads.done, plan.count, children, started,
                                  sum(out.reloads.handed.values())))
            if report is not None:
                report(samples[-1])
        if streams is not None:
            out.streams = streams.stop()
            _count_handoffs(cfg, out, plan.persistent * out.reloads.done)
        load.stop()
    return samples, out


def _count_handoffs(cfg: dict[str, object], out: Outcome, want: int) -> None:
    """Read the hand-off and drain-timeout counters (the givers' counts reach /metrics at their next flush)."""
    def handed() -> bool:
        out.handed_off = value(scrape(cfg), "upgraderd_connections_handed_off_total", listener="echo")
        return out.handed_off >= want
    try:
        wait_until(handed, 10, f"{want} connections counted as handed off")
    except AssertionError:
        pass  # the verdict reports the count
    out.drain_timeouts = value(scrape(cfg), "upgraderd_drain_timeouts_total")


def verdict(samples: list[Sample], failures: dict[str, int], rss_slack: float, clients: int) -> list[str]:
    """Return what went wrong (empty: nothing).

    The workers' fds include the client connections open at that moment, so
    they may differ by up to the number of client threads between samples.
    """
    first, last = samples[0], samples[-1]
    problems = []
    if failures:
        problems.append(f"failed round trips: {failures}")
    if last.master_fds != first.master_fds:
        problems.append(f"master fds {first.master_fds} -> {last.master_fds}")
    if last.master_threads != first.master_threads:
        problems.append(f"master threads {first.master_threads} -> {last.master_threads}")
    if last.master_rss_mb - first.master_rss_mb > rss_slack:
        problems.append(f"master RSS {first.master_rss_mb:.1f} -> {last.master_rss_mb:.1f} MB")
    if abs(last.worker_fds - first.worker_fds) > clients:
        problems.append(f"worker fds {first.worker_fds} -> {last.worker_fds}")
    return problems


def _row(s: Sample) -> str:
    per = s.elapsed / s.reloads if s.reloads else 0.0
    return (f"| {s.reloads} | {s.elapsed:.0f} | {per:.3f} | {s.master_fds} | {s.master_rss_mb:.1f} | "
            f"{s.master_threads} | {s.workers} | {s.worker_fds} | {s.worker_rss_mb:.1f} | {s.handed} |")


def _handoff_problems(plan: Plan, out: Outcome) -> list[str]:
    """Print the persistent clients' and the hand-offs' figures; return what went wrong."""
    problems, r = [], out.reloads
    want = plan.persistent * r.done
    per = sorted(r.handed.values())
    assert out.streams is not None
    print(f"persistent: {plan.persistent} connections, {out.streams.ok} round trips, failures: "
          f"{dict(out.streams.failures) or 0}, same ports: {out.streams.ports_kept}; "
          f"handed off: {out.handed_off:.0f} (at least {want}); drain timeouts: {out.drain_timeouts:.0f}")
    print(f"hand-offs logged: {sum(per)} of {sum(r.held.values())} held at drain, over {len(per)} old generations "
          f"(per reload min {per[0] if per else 0}, median {per[len(per) // 2] if per else 0}, "
          f"max {per[-1] if per else 0}); reloads without a hand-off: {len(r.without_handoff)}")
    if out.streams.failures or not out.streams.ports_kept:
        problems.append(f"persistent connections lost: {dict(out.streams.failures)} {out.streams.examples}")
    if out.handed_off < want or out.drain_timeouts:
        problems.append(f"handed off {out.handed_off:.0f} connections (at least {want} due), "
                        f"{out.drain_timeouts:.0f} drain timeouts")
    if r.without_handoff:
        problems.append(f"generations that handed nothing over: {r.without_handoff[:20]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print its table; exit 1 on loss or growth."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="python -m bench.soak [options]")
    p.add_argument("--reloads", type=int, default=1000)
    p.add_argument("--every", type=int, default=100, help="sample every N reloads")
    p.add_argument("--load", default="echo", choices=["echo", "echo-keepalive", "http"])
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--prefork", action="store_true",
                   help="fork the workers from a warm template (a reload takes a fraction of the time)")
    p.add_argument("--cold", action="store_true", help="with --prefork: no warm standby (see above)")
    p.add_argument("--rss-slack", type=float, default=2.0, help="MB of master RSS growth allowed")
    p.add_argument("--persistent", type=int, default=0,
                   help="echo connections held for the whole run, handed off at every reload")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="start no reload after this many seconds; report the reloads done")
    p.add_argument("--pause", type=float, default=0.005, help="seconds between a persistent client's round trips")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds a client waits for an answer")
    args = p.parse_args(argv)
    plan = Plan(args.reloads, args.every, args.load, args.threads, args.workers, args.prefork, not args.cold,
                args.persistent, args.max_seconds, args.pause, args.timeout)
    print(f"soak: up to {args.reloads} reloads under {args.load} load ({args.threads} client threads, "
          f"{args.persistent} persistent {args.pause:g}s apart, {args.workers} {'prefork ' if args.prefork else ''}"
          f"{'cold ' if args.prefork and args.cold else ''}workers)"
          + (f", at most {args.max_seconds:.0f}s" if args.max_seconds else ""), flush=True)
    print("| reloads | s | s/reload | master fds | master RSS MB | master threads | workers | worker fds "
          "| worker RSS MB | handed (log) |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="upgraderd-soak-") as tmp:
        samples, out = run(plan, Path(tmp), report=lambda s: print(_row(s), flush=True))
    load = out.load
    print(f"soak: {out.reloads.done} reloads in {time.monotonic() - started:.0f}s"
          + (f" (stopped by --max-seconds before {args.reloads})" if out.reloads.done < args.reloads else ""))
    print(f"round trips: {load.result.ok} ok, failures: {load.result.failures or 0}")
    problems = verdict(samples, load.result.failures, args.rss_slack, args.threads + args.persistent)
    problems += [f"failed reload: {x}" for x in out.reloads.failed[:20]]
    if out.streams is not None:
        problems += _handoff_problems(plan, out)
    for line in problems:
        print(f"FAIL: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
