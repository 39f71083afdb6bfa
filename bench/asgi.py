"""Benchmark: upgraderd's own ASGI server beside uvicorn[standard] and granian, and its reloads.

One run, the same apps and the same client (bench/http_client.c, C, epoll, 64
connections) for every server, 4 workers each:

- throughput: keep-alive requests/s, requests/s with a new connection per
  request, and p99 latency, for a hello-world ASGI app (config/examples/asgi_app.py)
  and the FastAPI example's JSON hello world (config/examples/fastapi_app.py, `/`);
  upgraderd (`app: asgi:...`, forked from a template, access log off), uvicorn
  (`--workers 4 --loop uvloop --http httptools --no-access-log`), granian
  (`--interface asgi --workers 4 --loop uvloop --no-access-log`), one after the
  other, `--repeats` rounds interleaved, each figure the median; upgraderd's
  listener in `mode: shared` as in config/examples/fastapi.yaml (one accept
  queue, spread over the workers by `http.busy_limit`); `--servers` may add
  `upgraderd-reuseport` (one queue per worker slot);
- memory: PSS per forked upgraderd worker with FastAPI loaded, and RSS per
  exec'd uvicorn worker serving the same app;
- reloads, FastAPI app, `--hups` HUPs `--interval` s apart, under 64 keep-alive
  clients and then 64 clients with a new connection per request, each waiting
  `--think` ms between requests (a saturating load makes every new template
  wait for a core, and measures the machine, not the reload): failed
  requests, reconnects (keep-alive answers that said Connection: close),
  HUP -> new generation ACTIVE p50 (the master's own figure), and the answers in
  the first 250 ms after each HUP over the steady rate (the 250 ms windows that
  start more than 1 s after any HUP), beside the lowest of those steady windows
  over their own median (how far a window strays with no HUP); upgraderd's `app:` beside
  config/examples/uvicorn_server.py run as a `command:` worker (the same app).

Run from the repository root (needs gcc, uvicorn[standard], granian, fastapi):

    .venv/bin/python -m bench.asgi [--seconds 5] [--repeats 3] [--hups 20] [--interval 1.0]
"""

from __future__ import annotations

import argparse
import json
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
from pathlib import Path
from typing import Any, Iterator
from contextlib import contextmanager

from tests.support.upgraderd_proc import Daemon, alive, children, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "config" / "examples"
BIN = Path(sys.executable).parent
WORKERS, CONNS, WINDOW = 4, 64, 0.25
APPS = {"hello": ("asgi_app", "/"), "fastapi": ("fastapi_app", "/")}


def build_client(tmp: Path) -> Path:
    out = tmp / "http_client"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(ROOT / "bench" / "http_client.c")], check=True)
    return out


def load(client: Path, port: int, seconds: float, mode: str, path: str, conns: int = CONNS,
         think_ms: float = 0.0) -> dict[str, Any]:
    """Run the C client; return its JSON report."""
    out = subprocess.run([str(client), "127.0.0.1", str(port), str(conns), str(seconds), mode, path, str(think_ms)],
                         capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def kb(pid: int, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@contextmanager
def upgraderd(tmp: Path, module: str, port: int, mode: str = "shared") -> Iterator[list[int]]:
    cfg = {"listeners": [{"name": "web", "host": "127.0.0.1", "port": port, "mode": mode}],
           "workers": {"count": WORKERS, "app": f"asgi:{module}:app", "cwd": str(EXAMPLES)},
           "http": {"access_log": False}, "metrics": {"listen": None}}
    with Daemon(tmp, cfg).start() as d:
        wait_until(lambda: len([p for p in d.workers() if comm(p) == "upgraderd-work"]) == WORKERS, 20, "workers")
        yield [p for p in d.workers() if comm(p) == "upgraderd-work"]


@contextmanager
def server_process(argv: list[str], port: int, cwd: Path) -> Iterator[list[int]]:
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES)}
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    seen: set[int] = set()
    try:
        wait_until(lambda: answers(port), 30, f"{argv[0]} to answer")
        wait_until(lambda: len(children(proc.pid)) >= WORKERS, 20, "its workers")
        seen = children(proc.pid)
        yield sorted(seen)
    finally:
        seen |= children(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def uvicorn(module: str, port: int) -> Any:
    return server_process([str(BIN / "python"), "-m", "uvicorn", f"{module}:app", "--app-dir", str(EXAMPLES),
                           "--host", "127.0.0.1", "--port", str(port), "--workers", str(WORKERS),
                           "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"],
                          port, EXAMPLES)


def granian(module: str, port: int) -> Any:
    return server_process([str(BIN / "granian"), "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port),
                           "--workers", str(WORKERS), "--loop", "uvloop", "--no-access-log", "--log-level", "warning",
                           f"{module}:app"], port, EXAMPLES)


def server(name: str, tmp: Path, module: str, port: int) -> Any:
    """Start server `name`: upgraderd (one shared socket), upgraderd-reuseport (reuseport slots), uvicorn, granian."""
    if name.startswith("upgraderd"):
        return upgraderd(tmp, module, port, "reuseport" if name == "upgraderd-reuseport" else "shared")
    return uvicorn(module, port) if name == "uvicorn" else granian(module, port)


def throughput(client: Path, tmp: Path, seconds: float, repeats: int, servers: list[str],
               apps: list[str]) -> dict[tuple[str, str], dict[str, list[float]]]:
    """Every server on every app, `repeats` interleaved rounds."""
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in range(repeats):
        for app in apps:
            module, path = APPS[app]
            for name in servers:
                port = free_port()
                ctx = server(name, tmp / f"{name}-{app}-{r}", module, port)
                (tmp / f"{name}-{app}-{r}").mkdir(exist_ok=True)
                with ctx as pids:
                    load(client, port, 1.0, "keepalive", path)   # warm-up
                    ka = load(client, port, seconds, "keepalive", path)
                    nc = load(client, port, seconds, "close", path)
                    mem = statistics.mean(kb(p, "Pss" if name.startswith("upgraderd") else "Rss") for p in pids)
                row = out.setdefault((app, name), {})
                for key, value in (("ka_rps", ka["requests"] / seconds), ("ka_p99", ka["p99_us"]),
                                   ("nc_rps", nc["requests"] / seconds), ("nc_p99", nc["p99_us"]),
                                   ("errors", ka["errors"] + nc["errors"]), ("mem_kb", mem)):
                    row.setdefault(key, []).append(float(value))
                print(f"  round {r + 1} {app:8} {name:16} keep-alive {ka['requests'] / seconds:8.0f}/s "
                      f"p99 {ka['p99_us']}us  new-conn {nc['requests'] / seconds:7.0f}/s p99 {nc['p99_us']}us "
                      f"errors {ka['errors'] + nc['errors']}  mem {mem / 1024:.1f} MiB", flush=True)
    return out


def reloads(client: Path, tmp: Path, system: str, mode: str, hups: int, interval: float,
            think_ms: float) -> dict[str, float]:
    """HUP an upgraderd serving the FastAPI app `hups` times under load; return the figures."""
    port = free_port()
    if system.startswith("app"):
        workers: dict[str, object] = {"count": WORKERS, "app": "asgi:fastapi_app:app", "cwd": str(EXAMPLES),
                                      "warm": True}
        if system == "app+preload":
            workers["preload"] = ["fastapi"]   # the standby imports FastAPI (and pydantic, starlette) before the HUP
    else:
        workers = {"count": WORKERS, "cwd": str(EXAMPLES),
                   "command": [str(BIN / "python"), "uvicorn_server.py", "--loop", "uvloop", "--app-dir", ".",
                               "--idle-grace", "1", "--timeout-graceful-shutdown", "20", "fastapi_app:app"]}
    # Each listener mode as its example has it: fastapi.yaml shared, uvicorn.yaml reuseport.
    listener = {"name": "web", "host": "127.0.0.1", "port": port,
                "mode": "shared" if system.startswith("app") else "reuseport"}
    cfg = {"listeners": [listener], "workers": workers,
           "http": {"access_log": False}, "drain": {"timeout": "30s"}, "metrics": {"listen": None},
           "ready": {"timeout": "30s"}}
    work = tmp / f"reload-{system}-{mode}"
    work.mkdir()
    sent: list[float] = []
    with Daemon(work, cfg).start() as d:
        load(client, port, 1.0, mode, "/")

        def hupper() -> None:
            time.sleep(1.5)
            for _ in range(hups):
                sent.append(time.monotonic())
                d.send(signal.SIGHUP)
                time.sleep(interval)
        t = threading.Thread(target=hupper)
        t.start()
        report = load(client, port, 1.5 + hups * interval + 1.0, mode, "/", think_ms=think_ms)
        t.join()
        d.settled()   # HUPs that came while a generation was STARTING were coalesced (logged as queued)
        log = d.log()
        active = [float(x) for x in re.findall(r"reload done: generation \d+ ACTIVE ([0-9.]+)s after HUP", log)]
        # The generation's own start (a HUP that came while one was STARTING waits for it: coalesced).
        starts = [float(x) for x in re.findall(r"generation (?!1 )\d+ STARTING -> ACTIVE after ([0-9.]+)s", log)]
    slots, t0 = report["slots"], report["t0"]

    def rate(lo: float, hi: float) -> float:
        a, b = int((lo - t0) * 100), int((hi - t0) * 100)
        return sum(slots[max(a, 0):max(b, 0)]) / (hi - lo)
    steady = [rate(w, w + WINDOW) for w in (t0 + i * WINDOW for i in range(int((len(slots) / 100) / WINDOW)))
              if w > t0 + 0.5 and w + WINDOW < t0 + len(slots) / 100 - 0.2
              and all(not (h - WINDOW < w < h + 1.0) for h in sent)]
    base = statistics.median(steady) if steady else 0.0
    ratios = [rate(h, h + WINDOW) / base for h in sent] if base and sent else [0.0]
    return {"errors": report["errors"], "reconnects": report["closes"],
            "active_p50_ms": statistics.median(active) * 1000 if active else -1.0,
            "active_p95_ms": statistics.quantiles(active, n=20)[-1] * 1000 if len(active) > 1 else -1.0,
            "stale_standbys": float(log.count("exec'ing a fresh template")),
            **standby_timing(log),
            "start_p50_ms": statistics.median(starts) * 1000 if starts else -1.0,
            "first_250ms_median": statistics.median(ratios), "first_250ms_min": min(ratios),
            # the same ratio for the steady windows themselves: how far one 250 ms window strays with no HUP
            "steady_min": min(steady) / base if base else 0.0, "steady_windows": float(len(steady)),
            "requests": report["requests"], "hups": len(active), "sent": len(sent)}


def standby_timing(log: str) -> dict[str, float]:
    """From the master's log: warm and cold template starts, how many warm ones were handed their
    generation before they had finished importing (the HUP then waits for the rest), and the
    template's app import (median ms)."""
    lines = log.splitlines()
    hup_at, done_at, warm, cold, late = -1, {}, 0, 0, 0
    for i, line in enumerate(lines):
        m = re.search(r"upgraderd template (\d+): standby (?:preloaded|imported)", line)
        if m:
            done_at[m[1]] = i
        if "received SIGHUP: reloading" in line:
            hup_at = i
        m = re.search(r"template pid (\d+) started( \(warm standby\))?", line)
        if m and hup_at >= 0:
            warm, cold = warm + bool(m[2]), cold + (not m[2])
            late += bool(m[2]) and done_at.get(m[1], len(lines)) > hup_at
    loads = [float(x) for x in re.findall(r"upgraderd template \d+: loaded \S+ in (\d+) ms", log)]
    return {"warm": warm, "cold": cold, "late": late, "load_ms": statistics.median(loads) if loads else -1.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hups", type=int, default=20)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--servers", default="upgraderd,uvicorn,granian",
                        help="throughput: upgraderd, upgraderd-reuseport (mode: reuseport), uvicorn, granian "
                             "(uvicorn is the ratios' reference: keep it)")
    parser.add_argument("--apps", default=",".join(APPS), help="throughput: hello, fastapi")
    parser.add_argument("--modes", default="keepalive,close", help="reload runs' client modes")
    parser.add_argument("--systems", default="app,app+preload,uvicorn_server.py",
                        help="reload runs: app (warm standby), app+preload (workers.preload: [fastapi]), "
                             "uvicorn_server.py (a command: worker)")
    parser.add_argument("--think", type=float, default=100.0,
                        help="ms each reload-run client waits between requests (default 100: a load that leaves "
                             "the machine room, as a saturating one makes every new process wait for a core)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-asgi-") as t:
        tmp = Path(t)
        client = build_client(tmp)
        if not args.skip_throughput:
            table = throughput(client, tmp, args.seconds, args.repeats, args.servers.split(","),
                               args.apps.split(","))
            print(f"\nthroughput, {WORKERS} workers each, {CONNS} connections, median of {args.repeats}:")
            print(f"{'app':8} {'server':16} {'keep-alive/s':>12} {'p99 us':>7} {'new-conn/s':>10} {'p99 us':>7} "
                  f"{'errors':>6} {'mem MiB':>8}  ratios to uvicorn (ka, nc)")
            for (app, name), row in table.items():
                med = {k: statistics.median(v) for k, v in row.items()}
                uv = {k: statistics.median(v) for k, v in table[(app, "uvicorn")].items()}
                print(f"{app:8} {name:16} {med['ka_rps']:12.0f} {med['ka_p99']:7.0f} {med['nc_rps']:10.0f} "
                      f"{med['nc_p99']:7.0f} {sum(row['errors']):6.0f} {med['mem_kb'] / 1024:8.1f}  "
                      f"{med['ka_rps'] / uv['ka_rps']:.2f} {med['nc_rps'] / uv['nc_rps']:.2f}")
            print("(mem: PSS per worker for upgraderd's forked workers, RSS per worker for the others)")
        if not args.hups:
            return 0
        print(f"\nreloads, FastAPI app, {args.hups} HUPs {args.interval} s apart, {CONNS} clients, "
              f"{args.think:g} ms between requests:")
        for mode in args.modes.split(","):
            for system in args.systems.split(","):
                r = reloads(client, tmp, system, mode, args.hups, args.interval, args.think)
                print(f"  {system:18} {mode:9} requests {r['requests']:7.0f} failed {r['errors']:3.0f} "
                      f"reconnects {r['reconnects']:4.0f}  HUP->ACTIVE p50 {r['active_p50_ms']:6.0f} ms "
                      f"p95 {r['active_p95_ms']:6.0f} ms "
                      f"(STARTING->ACTIVE {r['start_p50_ms']:5.0f} ms)  "
                      f"first 250 ms / steady: median {r['first_250ms_median']:.2f} min {r['first_250ms_min']:.2f} "
                      f"(steady windows' own min {r['steady_min']:.2f} of {r['steady_windows']:.0f}) "
                      f"({r['hups']:.0f} reloads for {r['sent']:.0f} HUPs; stale standbys {r['stale_standbys']:.0f}; "
                      f"templates warm {r['warm']:.0f} (still importing at the HUP {r['late']:.0f}) cold {r['cold']:.0f}, "
                      f"app import p50 {r['load_ms']:.0f} ms; "
                      f"load average {os.getloadavg()[0]:.1f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
