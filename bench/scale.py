"""Benchmark: what a generation costs as `workers.count` grows, with the shipped default config.

For each count, one daemon runs config/upgraderd.yaml as shipped (prefork,
warm standby), changing only `workers.count` and the ports. After generation
1 is ACTIVE, each of --reloads HUPs is sent only once the previous one's
old generation has retired and the next standby is up (steady state), and
measured (steady state: the standby has done its imports and waits, as
/proc/PID/syscall shows):

- HUP -> ACTIVE: the master's own figure ("reload done: generation N ACTIVE
  Xs after HUP", from the HUP's arrival to the last worker's READY=1);
- the master's CPU per HUP: utime+stime from /proc/PID/stat, from just
  before the HUP until the old generation has retired and the new standby
  is up (so it includes the drain, reaping and the standby's start);
- the generation's CPU: the run time (/proc/PID/schedstat) of its template
  (less what it used as a standby before the HUP) and workers, read in steady state (what the new generation cost the machine, whatever the load;
  divided by the cores it bounds HUP -> ACTIVE on an idle machine from below);
- the workers' total PSS (/proc/PID/smaps_rollup) and the master's RSS
  (VmRSS), read after the last reload;
- the floor: the least N forked Python workers take here with no set-up and
  no master (`python -m bench.scale_fork --floor N`, in the same run), and
  HUP -> ACTIVE as a multiple of it.

The master runs as the shipped systemd units run it: with RuntimeDirectory=
(`$RUNTIME_DIRECTORY`, a tmpfs: its metric files and hand-off channels go
there, system/rundir.py), here a fresh directory under /dev/shm.
`--runtime-dir tmpdir` leaves it unset, so they go to $TMPDIR as without
systemd (the test's directory, on this machine's disk).

    .venv/bin/python -m bench.scale [--counts 4 16 32 64 128 256] [--reloads 5] [--runtime-dir tmpfs|tmpdir]

It prints a table of medians (and the mean of HUP -> ACTIVE, which the
figures taken before flow control were) as it goes. Every process it starts
is stopped by its pid (Daemon.stop: the master, then any worker left).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests.support import ROOT
from tests.support.upgraderd_proc import Daemon, free_port, wait_until

TICK = os.sysconf("SC_CLK_TCK")


def shipped(count: int) -> dict[str, object]:
    """Return config/upgraderd.yaml with `count` workers and free ports."""
    cfg = yaml.safe_load((ROOT / "config" / "upgraderd.yaml").read_text())
    cfg["workers"]["count"] = count
    cfg["listeners"][0]["port"] = free_port()
    cfg["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
    return cfg  # type: ignore[no-any-return]


def cpu_seconds(pid: int) -> float:
    """Return utime + stime of `pid` in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def run_seconds(pid: int) -> float:
    """Return the CPU time `pid` has run, in seconds, to the nanosecond (/proc/PID/schedstat).

    utime and stime are sampled in clock ticks (10 ms): a worker's start-up, a
    few ms, mostly reads as 0 there.
    """
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def children(pid: int) -> dict[int, str]:
    """Return the master's children by pid, with their comm."""
    out = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            out[int(child)] = Path(f"/proc/{child}/comm").read_text().strip()
        except OSError:
            pass
    return out


def kib(path: str, key: str) -> int:
    """Return the `key:` line of a /proc file in KiB (0 if the process is gone)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


RECVMSG = {"x86_64": 47, "aarch64": 212}.get(os.uname().machine)


def waiting(pid: int) -> bool:
    """Return True if `pid` is blocked in recvmsg (a template or standby waiting on its channel)."""
    try:
        call = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return RECVMSG is None or (bool(call) and call[0] == str(RECVMSG))


def steady(d: Daemon, count: int) -> None:
    """Wait until exactly `count` workers and two templates (the live one, and the standby
    done with its imports) run, both waiting on their channels."""
    def done() -> bool:
        kids = children(d.pid)
        tmpl = [pid for pid, comm in kids.items() if comm == "upgraderd-tmpl"]
        return list(kids.values()).count("upgraderd-work") == count and len(tmpl) == 2 \
            and all(waiting(pid) for pid in tmpl)
    wait_until(done, 120, f"{count} workers and a standby", interval=0.05)


def run_count(count: int, reloads: int, runtime_dir: str | None) -> dict[str, float]:
    env = {} if runtime_dir is None else {"RUNTIME_DIRECTORY": runtime_dir}
    with tempfile.TemporaryDirectory() as tmp, Daemon(Path(tmp), shipped(count), env=env) as d:
        d.start(wait=False)
        d.wait_log(r"serving: generation 1 ACTIVE", timeout=180)
        steady(d, count)
        cpu, gen_cpu = [], []
        for n in range(2, reloads + 2):
            standby = max(pid for pid, comm in children(d.pid).items() if comm == "upgraderd-tmpl")
            before, preloaded = cpu_seconds(d.pid), run_seconds(standby)   # its imports came before the HUP
            d.send(signal.SIGHUP)
            d.wait_log(rf"reload done: generation {n} ACTIVE", timeout=180)
            steady(d, count)
            cpu.append(cpu_seconds(d.pid) - before)
            gen_cpu.append(generation_cpu(d.pid) - preloaded)
        took = [float(x) for x in re.findall(r"ACTIVE ([0-9.]+)s after HUP", d.log())]
        assert len(took) == reloads and "queue full" not in d.log()
        workers = [pid for pid, comm in children(d.pid).items() if comm == "upgraderd-work"]
        pss = sum(kib(f"/proc/{pid}/smaps_rollup", "Pss") for pid in workers)
        rss = kib(f"/proc/{d.pid}/status", "VmRSS")
        code = d.stop()
        assert code == 0, f"the master exited {code}"
    return {"p50": statistics.median(took), "mean": statistics.mean(took), "max": max(took),
            "cpu": statistics.median(cpu), "gen_cpu": statistics.median(gen_cpu), "pss": pss / 1024,
            "rss": rss / 1024}


def generation_cpu(master: int) -> float:
    """Return the CPU seconds the new generation's template and workers have used (not the standby's)."""
    kids = children(master)
    templates = sorted(pid for pid, comm in kids.items() if comm == "upgraderd-tmpl")
    # The standby is the newest template (pids grow here; the bench runs far from a wrap-around).
    mine = [pid for pid, comm in kids.items() if comm == "upgraderd-work"] + templates[:-1]
    return sum(run_seconds(pid) for pid in mine)


def main() -> None:
    # A SIGTERM unwinds the with-blocks, so the daemon and its workers are stopped by pid.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[4, 16, 32, 64, 128, 256])
    ap.add_argument("--reloads", type=int, default=5)
    ap.add_argument("--runtime-dir", choices=["tmpfs", "tmpdir"], default="tmpfs")
    args = ap.parse_args()
    print(f"{'workers':>7} | {'HUP->ACTIVE p50':>15} {'mean':>8} {'max':>8} | {'floor':>8} {'ratio':>5} | "
          f"{'master CPU/HUP':>14} | {'generation CPU':>14} | {'workers PSS':>11} | {'master RSS':>10}")
    for count in args.counts:
        runtime_dir = tempfile.mkdtemp(prefix="bench-scale-", dir="/dev/shm") if args.runtime_dir == "tmpfs" else None
        try:
            r = run_count(count, args.reloads, runtime_dir)
        finally:
            if runtime_dir is not None:
                shutil.rmtree(runtime_dir, ignore_errors=True)
        floor = float(subprocess.run([sys.executable, "-m", "bench.scale_fork", "--floor", str(count)],
                                     check=True, capture_output=True, text=True, timeout=300).stdout) / 1e3
        print(f"{count:>7} | {r['p50'] * 1e3:>12.0f} ms {r['mean'] * 1e3:>5.0f} ms {r['max'] * 1e3:>5.0f} ms | "
              f"{floor * 1e3:>5.0f} ms {r['p50'] / floor:>4.1f}x | "
              f"{r['cpu'] * 1e3:>11.0f} ms | {r['gen_cpu'] * 1e3:>11.0f} ms | {r['pss']:>8.0f} MB | "
              f"{r['rss']:>7.0f} MB", flush=True)


if __name__ == "__main__":
    main()
