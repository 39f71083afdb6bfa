"""Benchmark: every example server in config/examples/, reloaded under load; count what is lost.

For each example (uvicorn on both of its loops) and each load pattern, one run
starts the daemon, puts the load on, sends HUPs a fixed interval apart, waits
until every old generation has retired, and stops the load:

- `new`: a new connection per request (tests/loadgen.py, `--clients` threads);
- `keepalive`: `--clients` keep-alive connections (tests/support/keepalive.py). Every
  answer must echo its request's sequence number and the client's own port; a
  client reconnects only when an answer says `Connection: close` (announced).
  A connection that ends any other way loses a request and counts as an
  unannounced reconnect.

It prints one table: requests answered, lost requests, announced and
unannounced reconnects, and how long after its HUP each old generation was gone
(`gone`), split into its two parts: HUP -> new generation ACTIVE (`actv`) and
the old one's DRAINING -> RETIRED (`drain`), p50 and p95 in ms. `lat99` and
`latmax` are round-trip latencies (ms): a client waits `--timeout` seconds
before it counts a request as lost, so a slow answer shows there, not as a
loss. With `--repeats` > 1, counts and times are medians over the runs, and
`lost` and `unannounced` are the worst run. Each run is a child process; the
worker-bind example runs in a network namespace of its own (`unshare -n`,
root), because its config sets net.ipv4.tcp_migrate_req, which is per namespace.

    .venv/bin/python -m bench.examples_drain [--hups 20] [--interval 1] [--clients 64]
        [--repeats 1] [--only uvicorn-uvloop,node] [--loads new,keepalive]
"""

from __future__ import annotations

import argparse
import json
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
from typing import Any


from tests.support.upgraderd_proc import ROOT, Daemon, free_port, wait_until  # noqa: E402
from tests.support.keepalive import KeepAliveLoad  # noqa: E402
from tests.support.loadgen import Load  # noqa: E402
from tests.support.reloads import example_config  # noqa: E402

# label -> (config/examples/NAME.yaml, worker command flags to replace)
EXAMPLES: dict[str, tuple[str, dict[str, str]]] = {
    "gunicorn": ("gunicorn", {}),
    "uvicorn-asyncio": ("uvicorn", {"loop": "asyncio"}),
    "uvicorn-uvloop": ("uvicorn", {"loop": "uvloop"}),
    "node": ("node", {}),
    "python_worker": ("python_worker", {}),
    "worker_bind": ("worker_bind", {}),
}
# Not run by default (--only uvicorn-plain): uvicorn's own command line on the same
# socket and app, the way the uvicorn example was run before uvicorn_server.py.
BASELINES: dict[str, tuple[str, list[str]]] = {
    "uvicorn-plain": ("uvicorn", [".venv/bin/uvicorn", "--fd", "{fd:web}", "--loop", "uvloop", "--app-dir",
                                  "config/examples", "--no-access-log", "asgi_app:app"]),
}
NETNS = {"worker_bind"}
MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


def reload_times(log: str) -> tuple[list[float], list[float]]:
    """Return, per reload, seconds from HUP to the new generation ACTIVE, and the old one's drain."""
    active = {int(g): float(s) for g, s in
              re.findall(r"reload done: generation (\d+) ACTIVE ([0-9.]+)s after HUP", log)}
    drained = {int(g): float(s) for g, s in
               re.findall(r"generation (\d+) DRAINING -> RETIRED after ([0-9.]+)s", log)}
    done = [g for g in sorted(active) if g - 1 in drained]
    return [active[g] for g in done], [drained[g - 1] for g in done]


def config_for(label: str, port: int) -> dict[str, object]:
    """Return the config that runs example `label` on `port`."""
    if label in BASELINES:
        name, command = BASELINES[label]
        cfg = example_config(name, port)
        cfg["workers"]["command"] = command  # type: ignore[index]
        cfg["ready"] = {"mode": "delay", "after": "1s", "timeout": "30s"}  # it cannot notify
        return cfg
    name, args = EXAMPLES[label]
    return example_config(name, port, **args)


def draining(d: Daemon) -> bool:
    """Return True while the master reports a DRAINING generation (or no status yet)."""
    st = d.status()
    return st is None or any(g["state"] == "DRAINING" for g in st["generations"])


def start_load(kind: str, port: int, clients: int, seconds: float, timeout: float) -> Load:
    """Start a load of `kind` (new or keepalive) against 127.0.0.1:port."""
    if kind == "keepalive":
        return KeepAliveLoad("127.0.0.1", port, clients=clients, max_seconds=seconds, timeout=timeout).start()
    return Load("127.0.0.1", port, threads=clients, max_seconds=seconds, timeout=timeout).start("http")


def one_run(label: str, kind: str, hups: int, interval: float, clients: int, timeout: float) -> dict[str, Any]:
    """Run one example under one load with `hups` reloads; return what was seen."""
    port = free_port()
    cfg = config_for(label, port)
    with tempfile.TemporaryDirectory() as tmp, Daemon(Path(tmp), cfg).start() as d:
        load = start_load(kind, port, clients, hups * interval + 120, timeout)
        if not load.wait_for_ok(clients, 30):
            raise SystemExit(f"{label}/{kind}: no answers before the first reload: {load.result.outcomes}")
        t0 = time.monotonic()
        for i in range(hups):
            d.send(signal.SIGHUP)
            time.sleep(max(0.0, t0 + (i + 1) * interval - time.monotonic()))  # the HUP schedule
        newest = d.settled()
        d.wait_log(rf"generation {newest - 1} DRAINING -> RETIRED", timeout=60)
        wait_until(lambda: not draining(d), 60, "every old generation to retire")
        result = load.stop()
        log = d.log()
    return {
        "ok": result.ok, "lost": sum(result.failures.values()), "failures": result.failures,
        "examples": result.examples, "generations": newest,
        "latency_p99": percentile(result.latencies, 99), "latency_max": max(result.latencies, default=0.0),
        "announced": getattr(load, "announced", None), "unannounced": getattr(load, "unannounced", None),
        "active": reload_times(log)[0], "drain": reload_times(log)[1], "sigkill": "SIGKILL" in log,
    }


def in_own_netns() -> None:
    """Bring up loopback in this (new) network namespace and start it at tcp_migrate_req=0."""
    if os.readlink("/proc/self/ns/net") == os.environ.get("HOST_NETNS", ""):
        raise SystemExit("refusing to touch the caller's network namespace; run under unshare -n")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    Path(MIGRATE_REQ).write_text("0\n")


def child(label: str, kind: str, args: argparse.Namespace) -> None:
    """Run one trial and print it as one JSON line (the parent's view of a child)."""
    if label in NETNS:
        in_own_netns()
    print(json.dumps(one_run(label, kind, args.hups, args.interval, args.clients, args.timeout)))


def run_child(label: str, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one trial in a child process (in its own network namespace if it needs one)."""
    cmd = [sys.executable, __file__, "--child", label, kind, "--hups", str(args.hups),
           "--interval", str(args.interval), "--clients", str(args.clients), "--timeout", str(args.timeout)]
    env = dict(os.environ)
    if label in NETNS:
        cmd = ["unshare", "-n", *cmd]
        env["HOST_NETNS"] = os.readlink("/proc/self/ns/net")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        out, err = proc.communicate(timeout=args.hups * args.interval + 600)
    finally:
        if proc.poll() is None:
            proc.terminate()    # the child stops its daemon on SIGTERM
            proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{label}/{kind} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def available(label: str) -> str | None:
    """Return why `label` cannot run here, or None."""
    if label == "node" and shutil.which("node") is None:
        return "node is not installed"
    if label in NETNS and (os.geteuid() != 0 or shutil.which("unshare") is None):
        return "needs root and unshare for a network namespace"
    return None


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile (nearest rank) of `values`, or NaN if there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def times(run: dict[str, Any], key: str) -> list[float]:
    """Return a run's per-reload times: `active`, `drain`, or `gone` (their sum)."""
    if key == "gone":
        return [a + d for a, d in zip(run["active"], run["drain"])]
    return run[key]  # type: ignore[no-any-return]


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the row for one example and load over its repeated runs."""
    def med(key: str) -> Any:
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else None
    return {
        "ok": med("ok"), "lost": max(r["lost"] for r in runs), "announced": med("announced"),
        "unannounced": None if runs[0]["unannounced"] is None else max(r["unannounced"] for r in runs),
        **{f"{key}_p{q}": statistics.median(percentile(times(r, key), q) for r in runs)
           for key in ("gone", "active", "drain") for q in (50, 95)},
        "reloads": med("generations") - 1, "sigkill": any(r["sigkill"] for r in runs),
        "latency_p99": med("latency_p99"), "latency_max": max(r["latency_max"] for r in runs),
        "failures": [r["failures"] for r in runs if r["failures"]],
    }


def print_row(label: str, kind: str, row: dict[str, Any]) -> None:
    """Print one line of the table."""
    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.0f}"
    print(f"{label:<16}{kind:<10}{num(row['reloads']):>8}{num(row['ok']):>9}{num(row['lost']):>6}"
          f"{num(row['announced']):>10}{num(row['unannounced']):>12}"
          + "".join(f"{row[f'{k}_p{q}'] * 1000:>8.0f}" for k in ("gone", "active", "drain") for q in (50, 95))
          + f"{row['latency_p99'] * 1000:>8.0f}{row['latency_max'] * 1000:>8.0f}"
          + ("  SIGKILL" if row["sigkill"] else "") + "".join(f"  {f}" for f in row["failures"]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hups", type=int, default=20)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between HUPs")
    ap.add_argument("--clients", type=int, default=64, help="client threads / keep-alive connections")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="seconds a client waits for an answer before counting the request lost")
    ap.add_argument("--only", default=",".join(EXAMPLES),
                    help=f"comma-separated, from {', '.join([*EXAMPLES, *BASELINES])}")
    ap.add_argument("--loads", default="new,keepalive", help="comma-separated: new, keepalive")
    ap.add_argument("--child", nargs=2, metavar=("EXAMPLE", "LOAD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _stop)   # unwind, so each `with Daemon` stops its master
    if args.child:
        child(args.child[0], args.child[1], args)
        return
    print(f"{args.hups} HUPs {args.interval:g} s apart, {args.clients} clients, median of "
          f"{args.repeats} run(s); lost and unannounced: the worst run; times in ms")
    print(f"{'example':<16}{'load':<10}{'reloads':>8}{'answered':>9}{'lost':>6}"
          f"{'announced':>10}{'unannounced':>12}" + "".join(f"{h:>8}" for h in (
              "gone50", "gone95", "actv50", "actv95", "drain50", "drain95", "lat99", "latmax")))
    for label in args.only.split(","):
        if (why := available(label)) is not None:
            print(f"{label:<16}skipped: {why}")
            continue
        for kind in args.loads.split(","):
            print_row(label, kind, summarise([run_child(label, kind, args) for _ in range(args.repeats)]))


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


if __name__ == "__main__":
    main()
