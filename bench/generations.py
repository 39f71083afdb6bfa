"""Benchmark: how fast a generation turns over, exec'd workers vs prefork templates vs gunicorn.

One run, every system under the same client load, one after the other:

- upgraderd, built-in echo, 4 workers, each worker exec'd (`prefork: false`);
- upgraderd, built-in echo, 4 workers forked from a template (`prefork: true`), cold and warm
  (prefork and warm is what config/upgraderd.yaml, the default config, runs);
- upgraderd, built-in http, 4 forked workers (warm), keep-alive and connection-per-request clients;
- gunicorn (sync workers, 4), HUP, a one-line WSGI app, connection-per-request clients.

Per system: `--hups` HUPs, one every `--interval` seconds, under load. It reports
- HUP -> new generation ACTIVE, p50/p95 (upgraderd: the master's own figure;
  gunicorn: the HUP until the last of the new workers ran `post_worker_init`);
- old generation gone after the new one is ACTIVE, p50 (upgraderd: DRAINING ->
  RETIRED; gunicorn: the HUP until every old worker pid has exited);
- throughput in the first 250 ms after each HUP / throughput away from HUPs (with
  HUPs `--interval` 1 s apart, that is the second before the first HUP, served by
  generation 1), and / the 250 ms just before the same HUP. The two differ when a
  generation's steady rate differs from generation 1's: with 4 keep-alive clients
  on 4 workers, hand-off leaves one connection per worker, and on 2 cores one
  wake-up per request costs more than generation 1's uneven spread (2, 1, 1: up to
  two requests per wake-up); the rate is then lower before the HUP and after it
  alike (strace: 1.0 epoll_wait per request against 0.43);
- PSS per worker (/proc/PID/smaps_rollup) and the master's RSS.
Failed round trips are counted; any failure is a bug. With `--repeats N` every
system runs N times (interleaved: each round runs every system once) and each
figure is the median over the runs (failures: the sum).

`--pycache` runs the daemons with bytecode caching on (in a private cache
directory), as an installed upgraderd has it: an environment with
PYTHONDONTWRITEBYTECODE=1 makes every exec'd template and worker compile
upgraderd's own modules from source again (about 27 ms of CPU per template).

Run it from the repository root:

    .venv/bin/python -m bench.generations [--hups 10] [--interval 1.0] [--repeats 3] [--pycache]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.upgraderd_proc import Daemon, alive, children, echo_config, free_port, wait_until

WINDOW = 0.25
THREADS = 4


@dataclass
class Clients:
    """Round trips in threads; each success is timestamped (monotonic, at completion)."""

    port: int
    kind: str                     # echo | http | http-keepalive
    done: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Clients:
        """Start the client threads."""
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(THREADS)]
        for t in self.threads:
            t.start()
        return self

    def finish(self) -> None:
        """Stop and join the client threads."""
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _run(self) -> None:
        sock: socket.socket | None = None
        while not self.stop.is_set():
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                keep = self._round_trip(sock)
                self.done.append(time.monotonic())
            except OSError as e:
                self.failures.append(repr(e))
                keep = False
            if not keep and sock is not None:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    def _round_trip(self, sock: socket.socket) -> bool:
        """Make one round trip on `sock`; return True if it may be reused."""
        if self.kind == "echo":
            sock.sendall(b"x" * 64)
            got = b""
            while len(got) < 64:
                chunk = sock.recv(64 - len(got))
                if not chunk:
                    raise ConnectionError("echo cut short")
                got += chunk
            return False
        keepalive = self.kind == "http-keepalive"
        sock.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n" + (b"" if keepalive else b"Connection: close\r\n") + b"\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("response cut short")
            head += chunk
        top, _, body = head.partition(b"\r\n\r\n")
        if not top.startswith(b"HTTP/1.1 200") and not top.startswith(b"HTTP/1.0 200"):
            raise ConnectionError(f"bad status {top[:30]!r}")
        m = re.search(rb"(?i)content-length: *(\d+)", top)
        need = int(m.group(1)) if m else 0
        while len(body) < need:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("body cut short")
            body += chunk
        return keepalive and b"connection: close" not in top.lower()


def within(done: list[float], hups: list[float], lo: float, hi: float) -> int:
    """Return the round trips done in [h + lo, h + hi) of any HUP h (each counted once)."""
    return sum(1 for t in done if any(h + lo <= t < h + hi for h in hups))


def before_after_ratio(done: list[float], hups: list[float]) -> float:
    """Return the round trips in the WINDOW after each HUP over those in the WINDOW just before it.

    The same generation's steady state right before each HUP is the baseline, so a
    change of steady rate from one generation to the next (see the module docstring)
    does not count as a dip at the HUP.
    """
    before = within(done, hups, -WINDOW, 0.0)
    return within(done, hups, 0.0, WINDOW) / before if before else float("nan")


def throughput_ratio(done: list[float], hups: list[float], start: float, end: float) -> float:
    """Return the rate in the WINDOW after each HUP over the rate in the time far from any HUP."""
    near = within(done, hups, 0.0, WINDOW)
    far_time = (end - start) - sum(min(1.0, end - h) for h in hups)
    far = sum(1 for t in done if start <= t < end and not any(h <= t < h + 1.0 for h in hups))
    return (near / (WINDOW * len(hups))) / (far / far_time) if far and far_time > 0 else float("nan")


def pss_kb(pid: int) -> int:
    """Return the proportional set size of `pid` in kB (0 if gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def rss_kb(pid: int) -> int:
    """Return the resident set size of `pid` in kB."""
    m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def comm(pid: int) -> str:
    """Return /proc/PID/comm ('' if gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def p(values: list[float], q: float) -> float:
    """Return the q-quantile of `values` by nearest rank (the ceil(q * n)-th smallest)."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)] if s else float("nan")


ENV: dict[str, str] = {}   # extra environment of the daemons (--pycache)


def run_upgraderd(app: str, prefork: bool, kind: str, hups: int, interval: float,
                  warm: bool = False) -> dict[str, object]:
    """Run one upgraderd system through `hups` HUPs under load; return its figures."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = echo_config(port, workers={"count": 4, "app": app, "prefork": prefork, "warm": warm})
        with Daemon(Path(tmp), cfg, env=ENV).start() as d:
            clients = Clients(port, kind).start()
            time.sleep(1.0)  # warm-up before the measured span
            start, hup_times = time.monotonic(), []
            time.sleep(interval)  # a steady stretch before the first HUP
            for _ in range(hups):
                hup_times.append(time.monotonic())
                d.hup()
                time.sleep(interval)  # the HUP interval being benchmarked
            end = time.monotonic()
            final = d.settled()   # HUPs that arrive while a generation starts coalesce
            wait_until(lambda: len(re.findall(r"DRAINING -> RETIRED", d.log())) >= final - 1, 30,
                       "old generations gone")
            workers = [c for c in children(d.pid) if comm(c) != "upgraderd-tmpl"]
            pss = [pss_kb(w) for w in workers]
            master_rss = rss_kb(d.pid)
            clients.finish()
            log = d.log()
    took = [float(x) for x in re.findall(r"ACTIVE ([0-9.]+)s after HUP", log)]
    gone = [float(x) for x in re.findall(r"DRAINING -> RETIRED after ([0-9.]+)s", log)]
    return {"hup_active": took, "old_gone": gone,
            "ratio": throughput_ratio(clients.done, hup_times, start, end),
            "ratio_before": before_after_ratio(clients.done, hup_times),
            "failures": len(clients.failures), "pss_kb": pss, "master_rss_kb": master_rss,
            "round_trips": len(clients.done)}


GUNICORN_CONF = """
import time
def post_worker_init(worker):
    with open({path!r}, "a") as f:
        f.write(f"{{time.monotonic()}} {{worker.pid}}\\n")
"""
WSGI = "def app(environ, start_response):\n    start_response('200 OK', [('Content-Length', '3')])\n    return [b'ok\\n']\n"


def run_gunicorn(hups: int, interval: float) -> dict[str, object]:
    """Run gunicorn (4 sync workers) through `hups` HUPs under connection-per-request load."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        booted = Path(tmp) / "booted"
        (Path(tmp) / "conf.py").write_text(GUNICORN_CONF.format(path=str(booted)))
        (Path(tmp) / "wsgiapp.py").write_text(WSGI)
        gunicorn = Path(sys.executable).with_name("gunicorn")
        proc = subprocess.Popen([str(gunicorn), "-w", "4", "-b", f"127.0.0.1:{port}", "-c", "conf.py",
                                 "--graceful-timeout", "10", "wsgiapp:app"], cwd=tmp,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            return _drive_gunicorn(proc, port, booted, hups, interval)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _drive_gunicorn(proc: subprocess.Popen[bytes], port: int, booted: Path, hups: int,
                    interval: float) -> dict[str, object]:
    def boots() -> list[tuple[float, int]]:
        if not booted.exists():
            return []
        return [(float(t), int(pid)) for t, pid in (line.split() for line in booted.read_text().splitlines())]
    wait_until(lambda: len(boots()) >= 4, 20, "gunicorn's 4 workers")
    clients = Clients(port, "http").start()
    time.sleep(1.0)  # warm-up before the measured span
    start, hup_times, took, gone = time.monotonic(), [], [], []
    time.sleep(interval)  # a steady stretch before the first HUP
    for _ in range(hups):
        old = children(proc.pid)
        seen = len(boots())
        t0 = time.monotonic()
        hup_times.append(t0)
        os.kill(proc.pid, signal.SIGHUP)
        wait_until(lambda: len(boots()) >= seen + 4, 20, "gunicorn's new workers")
        took.append(boots()[seen + 3][0] - t0)
        wait_until(lambda: not any(alive(x) for x in old), 20, "gunicorn's old workers to exit")
        gone.append(time.monotonic() - t0)
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))  # the HUP interval being benchmarked
    end = time.monotonic()
    workers = children(proc.pid)
    pss, master_rss = [pss_kb(w) for w in workers], rss_kb(proc.pid)
    clients.finish()
    return {"hup_active": took, "old_gone": gone,
            "ratio": throughput_ratio(clients.done, hup_times, start, end),
            "ratio_before": before_after_ratio(clients.done, hup_times),
            "failures": len(clients.failures), "pss_kb": pss, "master_rss_kb": master_rss,
            "round_trips": len(clients.done)}


def main() -> None:
    """Run every system (`--repeats` times) and print one table of medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hups", type=int, default=10)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--pycache", action="store_true", help="run the daemons with bytecode caching on")
    ap.add_argument("--only", default="", help="comma-separated row numbers (1-6) to run")
    args = ap.parse_args()
    h, i = args.hups, args.interval
    rows = [
        ("upgraderd echo, exec'd workers", lambda: run_upgraderd("echo", False, "echo", h, i)),
        ("upgraderd echo, prefork (cold)", lambda: run_upgraderd("echo", True, "echo", h, i)),
        ("upgraderd echo, prefork warm (default)", lambda: run_upgraderd("echo", True, "echo", h, i, warm=True)),
        ("upgraderd http, warm, keep-alive", lambda: run_upgraderd("http", True, "http-keepalive", h, i, warm=True)),
        ("upgraderd http, warm", lambda: run_upgraderd("http", True, "http", h, i, warm=True)),
        ("gunicorn 27 sync, HUP", lambda: run_gunicorn(h, i)),
    ]
    if args.only:
        keep = {int(x) for x in args.only.split(",")}
        rows = [r for n, r in enumerate(rows, 1) if n in keep]
    with tempfile.TemporaryDirectory() as cache:
        if args.pycache:
            ENV.update(PYTHONDONTWRITEBYTECODE="", PYTHONPYCACHEPREFIX=cache)
        results: dict[str, list[dict[str, object]]] = {name: [] for name, _ in rows}
        load_before = os.getloadavg()[0]
        for _ in range(args.repeats):
            for name, run in rows:
                results[name].append(run())
        load_after = os.getloadavg()[0]
    print(f"{args.hups} HUPs every {args.interval:g}s under {THREADS} client threads, median of {args.repeats} "
          f"run(s){', bytecode cached' if args.pycache else ''}; load average {load_before:.1f} before, "
          f"{load_after:.1f} after, on {os.cpu_count()} cores")
    print(f"{'system':40} {'HUP->ACTIVE p50/p95 ms':>22} {'old gone p50 ms':>16} {'first 250ms/steady':>18} "
          f"{'/250ms before':>13} {'PSS/worker MB':>14} {'master RSS MB':>14} {'failed':>7}")
    for name, runs in results.items():
        figs = [figures(r) for r in runs]

        def med(key: str) -> float:
            return statistics.median(f[key] for f in figs)
        print(f"{name:40} {med('p50') * 1e3:10.0f} / {med('p95') * 1e3:<9.0f} {med('gone') * 1e3:16.0f} "
              f"{med('ratio'):18.2f} {med('before'):13.2f} {med('pss'):14.1f} {med('rss'):14.1f} "
              f"{sum(int(f['failures']) for f in figs):>7}", flush=True)
        print(f"{'':40} per run: HUP->ACTIVE p50 " + ", ".join(f"{f['p50'] * 1e3:.0f}" for f in figs)
              + "; first 250 ms ratio " + ", ".join(f"{f['ratio']:.2f}" for f in figs)
              + "; / 250 ms before " + ", ".join(f"{f['before']:.2f}" for f in figs), flush=True)


def figures(r: dict[str, object]) -> dict[str, float]:
    """Return one run's figures as numbers."""
    ha, og, pss = r["hup_active"], r["old_gone"], r["pss_kb"]
    assert isinstance(ha, list) and isinstance(og, list) and isinstance(pss, list)
    return {"p50": p(ha, .5), "p95": p(ha, .95), "gone": p(og, .5), "ratio": float(str(r["ratio"])),
            "before": float(str(r["ratio_before"])),
            "pss": statistics.median(pss) / 1024 if pss else 0.0, "rss": int(str(r["master_rss_kb"])) / 1024,
            "failures": float(str(r["failures"]))}

if __name__ == "__main__":
    main()
