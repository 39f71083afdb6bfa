"""Benchmark: three ways systemd can reload upgraderd, for docs/operations.md.

1. `ExecReload=/bin/kill -HUP $MAINPID` (the old unit): returns at once.
2. `ExecReload=upgraderd reload` (deploy/systemd/upgraderd.service): waits for the outcome.
3. `Type=notify-reload`: systemd waits for RELOADING=1 then READY=1 from the master;
   timed here as SIGHUP -> READY=1 on a stand-in notify socket.

For each, the median wall time until the command (or systemd) returns for a good
release, and what it reports for a release whose workers exit at start-up. No
client load: this measures what the caller waits for, not the data path.

    .venv/bin/python -m bench.reload_commands [--repeats 5]
"""

from __future__ import annotations

import argparse
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from tests.support.upgraderd_proc import ROOT, Daemon, echo_config, free_port  # noqa: E402

FIXTURE = str(ROOT / "tests" / "fixtures" / "echo_worker.py")


def _reload_cmd(d: Daemon) -> list[str]:
    return [sys.executable, "-m", "upgraderd", "reload", "--pidfile", str(d.pidfile)]


def _kill_cmd(d: Daemon) -> list[str]:
    return ["/bin/kill", "-HUP", str(d.pid)]


def _run(argv: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, cwd=ROOT, timeout=120)
    return time.perf_counter() - t0, r.returncode


def _ready_after_hup(d: Daemon, sock: socket.socket) -> tuple[float, str]:
    t0 = time.perf_counter()
    d.send(signal.SIGHUP)
    while True:
        msg = dict(ln.split("=", 1) for ln in sock.recv(4096).decode().splitlines() if "=" in ln)
        if msg.get("READY") == "1":
            return time.perf_counter() - t0, msg.get("STATUS", "")


def _drain(sock: socket.socket) -> None:
    """Drop the notifications still queued (those of a reload already timed)."""
    sock.settimeout(0.3)
    try:
        while True:
            sock.recv(4096)
    except TimeoutError:
        pass
    finally:
        sock.settimeout(60)


def measure(repeats: int) -> list[tuple[str, float, str]]:
    port = free_port()
    good = echo_config(port, count=2)
    bad = echo_config(port, count=2, ready={"timeout": "5s"})
    bad["workers"] = {"count": 2, "command": [sys.executable, FIXTURE, "--exit", "3"]}
    times: dict[str, list[float]] = {"kill": [], "reload": [], "notify": []}
    with tempfile.TemporaryDirectory() as tmp, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(f"{tmp}/notify.sock")
        with Daemon(Path(tmp), good, env={"NOTIFY_SOCKET": f"{tmp}/notify.sock"}).start() as d:
            for release in [good] * repeats + [bad]:
                d.write_config(release)
                _drain(notify)
                took, kill_rc = _run(_kill_cmd(d))
                times["kill"].append(took)
                d.settled()
                _drain(notify)
                took, reload_rc = _run(_reload_cmd(d))
                times["reload"].append(took)
                _drain(notify)
                took, status = _ready_after_hup(d, notify)
                times["notify"].append(took)
                d.settled()
    good_runs = slice(0, repeats)
    return [("ExecReload=kill -HUP", statistics.median(times["kill"][good_runs]), f"exit {kill_rc}"),
            ("ExecReload=upgraderd reload", statistics.median(times["reload"][good_runs]),
             f"exit {reload_rc}"),
            ("Type=notify-reload (HUP -> READY=1)", statistics.median(times["notify"][good_runs]),
             f"READY=1 (STATUS={status})")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"| reload via ({args.repeats} runs) | median seconds until it returns (good release) "
          "| what a failing release reports |\n|---|---|---|")
    for name, seconds, failing in measure(args.repeats):
        print(f"| {name} | {seconds:.3f} | {failing} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
