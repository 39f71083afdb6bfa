"""Benchmark: a master SIGKILLed under load and restarted at once. What do clients lose?

Each run starts a master (echo, 2 workers), puts connection-per-request load on
it, SIGKILLs the master, starts a new one with the same config and pidfile
at once, waits for 100 more good round trips, and counts the failed ones by
kind. Scenarios, run in the same invocation so machine noise mostly cancels:

- `before`: the code of `--before` (default: the commit this branch started
  from), run from an exported copy of that tree: orphans drain as soon as
  their master dies, and the new master binds anew;
- `takeover`: this tree; the orphans serve on and the new master takes their
  sockets with pidfd_getfd (needs root);
- `fdstore`: this tree under a stand-in fd store (tests/support/fdstore.py);
  the orphans are drained away with SIGTERM, as a service manager's stop of
  the cgroup would, so only the stored sockets hold the queues;
- `bind`: this tree, orphans drained at once with SIGTERM and no fd store:
  the worst case left, for reference.

Measured on 2 shared cores, 5 runs (docs/operations.md has the table): `before`
refused 28 paced round trips (median; max 43) over a 0.59 s window, and 12,054
of the looping load's; `takeover` and `fdstore` refused and reset 0 in every run.

Run it from the repository root, as root:

    .venv/bin/python -m bench.restart [--runs 5] [--before REV]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import socket
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from tests.support import ROOT
from tests.support.fdstore import FdStoreStandIn
from tests.support.loadgen import Load
from tests.support.upgraderd_proc import Daemon, echo_config, free_port, stop_after_restart, wait_until

SCENARIOS = ("before", "takeover", "fdstore", "bind")


def export(rev: str, into: Path) -> Path:
    """Export the `upgraderd` package of `rev` into `into`; return the directory to run it from."""
    archive = into / "before.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev, "upgraderd"], check=True)
    with tarfile.open(archive) as t:
        t.extractall(into / "tree")
    return into / "tree"


class Probe:
    """A paced client: one echo round trip every 10 ms, each outcome kept with its time.

    The load's own counts grow with how fast its threads retry; the probe's do
    not, so `window_s` (first to last refused probe) is the time the port
    refused connections, whatever the client load.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.refused: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(b"probe")
                    s.recv(8)
            except ConnectionRefusedError:
                self.refused.append(t)
            except OSError:
                pass  # the load counts resets and timeouts
            time.sleep(0.01)

    def close(self) -> tuple[int, float]:
        """Stop; return (refused probes, seconds from the first refused to the last)."""
        self.stop.set()
        self.thread.join(10)
        return len(self.refused), (self.refused[-1] - self.refused[0]) if self.refused else 0.0


def run_once(scenario: str, old_tree: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        work, port = Path(tmp), free_port()
        cfg = echo_config(port, count=2)
        store = FdStoreStandIn(work / "notify.sock") if scenario == "fdstore" else None
        env = {"NOTIFY_SOCKET": store.path} if store else {}
        wrap = ("env", f"--chdir={old_tree}") if scenario == "before" else ()
        d = Daemon(work, cfg, env=env, wrap=wrap).start()
        orphans: set[int] = set()
        d2 = None
        load = Load("127.0.0.1", port, threads=4, max_seconds=60).start("echo")
        probe = Probe(port)
        try:
            if store:
                wait_until(lambda: len(store.names()) == 2, 10, "the fd store to fill")
            load.wait_for_ok(200)
            before = load.result.failures
            orphans = d.workers()
            t0 = time.monotonic()
            d.send(signal.SIGKILL)
            assert d.proc is not None
            d.proc.wait(10)
            if scenario in ("fdstore", "bind"):
                for pid in orphans:
                    os.kill(pid, signal.SIGTERM)
            prefix, fds = store.wrap() if store else (wrap, ())
            d2 = Daemon(work, cfg, env=env, wrap=prefix, pass_fds=fds).start()
            active = time.monotonic() - t0
            load.wait_for_ok(load.result.ok + 200)
            result = load.stop()
        finally:
            load.stop()
            probed, window = probe.close()
            stop_after_restart(orphans, d, d2)
            if store:
                store.close()
    lost = {k: v - before.get(k, 0) for k, v in result.failures.items()}
    return {"refused": lost.get("refused", 0), "reset": lost.get("reset", 0),
            "other": sum(v for k, v in lost.items() if k not in ("refused", "reset")),
            "probe_refused": probed, "window_s": window, "restart_s": active, "ok": result.ok}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.restart", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--before", default="11ff890", help="git revision of the 'before' code")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the takeover needs pidfd_getfd over the orphans")
    scenarios = [s for s in args.scenarios.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        old = export(args.before, Path(tmp))
        rows: dict[str, list[dict[str, float]]] = {s: [] for s in scenarios}
        for _ in range(args.runs):
            for s in scenarios:  # interleaved: each scenario sees the same machine conditions
                rows[s].append(run_once(s, old))
    print(f"{args.runs} SIGKILL+restart runs per scenario, 4 client threads, a new TCP connection per "
          f"echo round trip, 2 reuseport workers; 'before' = {args.before}")
    cols = ["refused", "reset", "other", "probe_refused", "window_s", "restart_s"]
    print(f"{'scenario':<10}" + "".join(f"{c[:9] + ' med':>14}{c[:9] + ' max':>14}" for c in cols))
    for s, runs in rows.items():
        cells = []
        for c in cols:
            vals = [r[c] for r in runs]
            fmt = "{:>14.3f}" if c.endswith("_s") else "{:>14.0f}"
            cells.append(fmt.format(statistics.median(vals)) + fmt.format(max(vals)))
        print(f"{s:<10}" + "".join(cells))
    print("refused/reset/other: the load's failed round trips per restart; probe_refused: refused round trips "
          "of a 100/s paced client; window_s: first to last refused probe; restart_s: SIGKILL -> new "
          "generation 1 ACTIVE")


if __name__ == "__main__":
    main()
