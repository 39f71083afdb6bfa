"""Benchmark: what the asgi: worker's request metrics (apps/asgi/reqmetrics.py) cost per request.

Two figures, each the median of `--repeats` runs, in one run:

- the metrics' own cost: `RequestMetrics.request()` per request, plus a
  `flush()` to real metric files every 1,000 requests (the worker flushes at
  its 0.5 s tick, i.e. far more rarely under load), against the same loop with
  no metrics call at all;
- what one request costs the worker: a real upgraderd with one `asgi:`
  worker (config/examples/asgi_app.py, access log off) under the C client
  (bench/http_client.c, 8 keep-alive connections), its CPU time (utime + stime,
  /proc) over the answers.

The ratio "with metrics / without" is (per-request CPU + metrics cost) /
per-request CPU: the share of a worker's CPU the metrics add.

    .venv/bin/python -m bench.request_metrics [--repeats 5] [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.asgi import EXAMPLES, build_client, comm, load
from tests.support.upgraderd_proc import Daemon, free_port, wait_until
from upgraderd.apps.asgi.reqmetrics import RequestMetrics
from upgraderd.contract.env import METRICS_DIR

N = 200_000


def metrics_ns(tmp: Path) -> tuple[float, float]:
    """Return ns per request with and without the metrics calls."""
    os.environ[METRICS_DIR] = str(tmp)
    for prefix in ("counter", "gauge_livesum"):
        path = tmp / f"{prefix}_{os.getpid()}.db"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.posix_fallocate(fd, 0, 1 << 16)
        os.close(fd)
    m = RequestMetrics(["web"], True)
    assert m.enabled
    durations = [0.0003 * (i % 17) for i in range(1000)]
    t0 = time.perf_counter_ns()
    for i in range(N):
        m.request("web", 200 + (i & 1) * 204, durations[i % 1000])
        if i % 1000 == 999:
            m.flush({"web": 3}, False)
    with_ns = (time.perf_counter_ns() - t0) / N
    t0 = time.perf_counter_ns()
    for i in range(N):
        _ = durations[i % 1000]
        if i % 1000 == 999:
            pass
    return with_ns, (time.perf_counter_ns() - t0) / N


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def request_us(client: Path, seconds: float) -> float:
    """Return the worker's CPU microseconds per keep-alive hello-world request."""
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        cfg = {"listeners": [{"name": "web", "host": "127.0.0.1", "port": port}],
               "workers": {"count": 1, "app": "asgi:asgi_app:app", "cwd": str(EXAMPLES)},
               "http": {"access_log": False}, "metrics": {"listen": None}}
        with Daemon(Path(d), cfg).start() as daemon:
            pid = wait_until(lambda: next((p for p in daemon.workers() if comm(p) == "upgraderd-work"), None),
                             20, "the worker")
            assert isinstance(pid, int)
            before = cpu_ticks(pid)
            report = load(client, port, seconds, "keepalive", "/", conns=8)
            used = (cpu_ticks(pid) - before) / os.sysconf("SC_CLK_TCK")
            return used * 1e6 / max(1, int(report["requests"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        client = build_client(Path(tmp))
        micro = [metrics_ns(Path(tmp)) for _ in range(args.repeats)]
        per_request = [request_us(client, args.seconds) for _ in range(args.repeats)]
    cost = statistics.median(w - wo for w, wo in micro)
    cpu = statistics.median(per_request)
    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f}")
    print(f"metrics per request: {cost:.0f} ns (median of {args.repeats}; runs {[round(w - wo) for w, wo in micro]})")
    print(f"worker CPU per keep-alive request: {cpu:.1f} us (runs {[round(x, 1) for x in per_request]})")
    print(f"with metrics / without: {(cpu * 1000 + cost) / (cpu * 1000):.4f}")


if __name__ == "__main__":
    main()
