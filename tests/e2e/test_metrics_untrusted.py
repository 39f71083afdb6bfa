"""A real daemon against hostile metric files, unusable metric dirs and a flood of metrics clients."""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.upgraderd_proc import ROOT, Daemon, echo_config, http_config, free_port, wait_until
from tests.support.loadgen import Load
from tests.support.scrape import fetch, metrics_url, parse, scrape, value

pytestmark = pytest.mark.e2e

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                               reason="mounting a tmpfs in a private mount namespace needs root and unshare")




def entry_bytes(key: bytes, value_: float) -> bytes:
    """One entry as docs/metrics.md lays it out: u32 length, key, zero padding to 8, f64 value."""
    return struct.pack("<I", len(key)) + key + b"\0" * (-(len(key) + 4) % 8) + struct.pack("<d", value_)


def entry_end(data: bytes, pos: int) -> int:
    n = struct.unpack_from("<I", data, pos)[0]
    return pos + (4 + n + 7) // 8 * 8 + 8


def loop_forever(path: Path) -> None:
    """Make the second entry's length (-24 as a signed int) send a trusting reader back here, forever."""
    with open(path, "r+b") as f:
        data = f.read()
        f.seek(entry_end(data, 8))
        f.write(struct.pack("<I", (1 << 32) - 24))


def append_non_json(path: Path) -> None:
    with open(path, "r+b") as f:
        data = f.read()
        used = struct.unpack_from("<I", data, 4)[0]
        body = entry_bytes(b"{not json", 1.0)
        f.seek(used)
        f.write(body)
        f.seek(4)
        f.write(struct.pack("<I", used + len(body)))


def huge_used(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(4)
        f.write(struct.pack("<I", 256 << 20))


def planted(mp: Path, pid: int, value_: float, truncate_to: int | None = None) -> Path:
    """Write a well-formed counter file for a pid that is no worker, then damage it."""
    key = json.dumps(["upgraderd_connections_accepted", "upgraderd_connections_accepted_total",
                      {"listener": "web"}, "Connections accepted by the built-in workers."]).encode()
    entry = entry_bytes(key, value_)
    data = b"UGM1" + struct.pack("<I", 8 + len(entry)) + entry
    p = mp / f"counter_{pid}.db"
    p.write_bytes(data[:truncate_to] if truncate_to else data)
    return p


def test_corrupt_files_of_live_workers_are_set_aside_and_metrics_keep_answering(tmp_path):
    port, mp = free_port(), tmp_path / "mp"
    cfg = http_config(port, mp)
    with Daemon(tmp_path, cfg).start() as d:
        a, b = sorted(d.wait_workers(2))
        wait_until(lambda: all((mp / f"{t}_{p}.db").exists() for p in (a, b) for t in ("counter", "gauge_livesum")),
                   10, "the workers' metric files")
        loop_forever(mp / f"counter_{a}.db")
        huge_used(mp / f"gauge_livesum_{a}.db")
        append_non_json(mp / f"counter_{b}.db")
        planted(mp, 999999001, math.nan)
        planted(mp, 999999002, 5.0, truncate_to=40)
        for _ in range(5):
            status, body, _ = fetch(metrics_url(cfg))
            assert status == 200
        s = parse(body)
        expected = {"entry": 1, "size": 2, "key": 1, "value": 1, "unreadable": 0, "format": 0, "slow": 0}
        assert {r: value(s, "upgraderd_metric_files_rejected_total", reason=r) for r in expected} == expected
        assert fetch(metrics_url(cfg, "/healthz"))[0] == 200
        assert sorted(p.name for p in mp.iterdir() if p.name.endswith(".rejected")) == sorted(
            [f"counter_{a}.db.rejected", f"gauge_livesum_{a}.db.rejected", f"counter_{b}.db.rejected",
             "counter_999999001.db.rejected", "counter_999999002.db.rejected"])

        d.reload_to(2)  # the old workers are reaped and folded: their files are already set aside
        # Until they exit, old workers may still take a connection and count it in a set-aside file.
        d.wait_log(r"generation 1 DRAINING -> RETIRED")
        load = Load("127.0.0.1", port, threads=2, max_seconds=60).start("http")
        assert load.wait_for_ok(200)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        wait_until(lambda: value(scrape(cfg), "upgraderd_connections_accepted_total", listener="web") == result.ok,
                   10, f"the new generation's {result.ok} connections to be counted, and nothing else")
        assert d.proc is not None and d.proc.poll() is None
        assert "Traceback" not in d.log()


def unshared(script: str, mount_point: Path) -> tuple[str, ...]:
    """A wrapper that runs `script` in a private mount namespace, then execs the master."""
    return ("unshare", "-m", "--propagation", "private", "sh", "-c", script + ' && exec "$@"', str(mount_point))


READ_ONLY = 'mount -t tmpfs -o ro,size=64k tmpfs "$0"'
FULL = 'mount -t tmpfs -o size=64k tmpfs "$0" && { dd if=/dev/zero of="$0/fill" bs=4k 2>/dev/null; true; }'


def serve_through_a_reload(d: Daemon, port: int) -> int:
    """Load the daemon across one reload; return the round trips, after checking none failed."""
    load = Load("127.0.0.1", port, threads=2, max_seconds=60).start("http")
    assert load.wait_for_ok(100)
    d.reload_to(2)
    n = load.result.ok
    assert load.wait_for_ok(n + 100)
    result = load.stop()
    assert result.failures == {}, (result.failures, result.examples)
    return result.ok


@ROOT_ONLY
def test_a_full_metrics_tmpfs_leaves_workers_serving_without_metrics(tmp_path):
    port, mp = free_port(), tmp_path / "mp"
    mp.mkdir()
    cfg = http_config(port, mp)
    with Daemon(tmp_path, cfg, wrap=unshared(FULL, mp)).start() as d:
        assert serve_through_a_reload(d, port) > 200
        # Each of the 4 workers (2 per generation) says so once; wait for the last line to land.
        d.wait_log(r"upgraderd worker \d+: connection metrics disabled, .*No space left on device", count=4)
        said = re.findall(r"upgraderd worker (\d+): connection metrics disabled, .*No space left on device", d.log())
        assert len(said) == 4 and len(set(said)) == 4
        d.wait_log(r"generation 1 DRAINING -> RETIRED")
        s = scrape(cfg)
        assert value(s, "upgraderd_worker_exits_total", reason="signal") == 0  # no SIGBUS
        assert value(s, "upgraderd_worker_exits_total", reason="clean") == 2  # generation 1, drained
        assert value(s, "upgraderd_worker_restarts_total") == 0


@ROOT_ONLY
def test_a_read_only_metrics_dir_disables_worker_metrics_not_the_master(tmp_path):
    port, mp = free_port(), tmp_path / "mp"
    mp.mkdir()
    cfg = http_config(port, mp)
    with Daemon(tmp_path, cfg, wrap=unshared(READ_ONLY, mp)).start() as d:
        assert serve_through_a_reload(d, port) > 200
        assert "workers' metrics disabled: metrics directory" in d.log()
        s = scrape(cfg)
        assert value(s, "upgraderd_worker_metrics_enabled") == 0
        assert value(s, "upgraderd_worker_exits_total", reason="error") == 0


WRITER = """
from upgraderd.apps.connmetrics import ConnectionMetrics
m = ConnectionMetrics(["web"])
n = ConnectionMetrics(["web"])   # a second Server of the same worker: still one message
for _ in range(1000):
    m.accepted("web"); m.received("web", 100); m.flush()
print("served", m.enabled, n.enabled)
"""


@ROOT_ONLY
@pytest.mark.parametrize("setup", [READ_ONLY, FULL], ids=["read-only", "full"])
def test_a_worker_that_cannot_write_metrics_serves_on_and_says_so_once(tmp_path, setup):
    mp = tmp_path / "mp"
    mp.mkdir()
    env = {**os.environ, "UPGRADERD_METRICS_DIR": str(mp), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([*unshared(setup, mp), sys.executable, "-c", WRITER], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr  # -7 would be SIGBUS
    assert out.stdout.strip() == "served False False"
    assert out.stderr.count("connection metrics disabled") == 1, out.stderr


def _raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n:
        pytest.skip(f"the test needs {n} fds; the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def open_idle(address: str, n: int) -> list[socket.socket]:
    """Open `n` connections to `address` and send nothing on them."""
    host, _, port = address.rpartition(":")
    out = []
    for _ in range(n):
        out.append(socket.create_connection((host, int(port)), timeout=10))
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit(1) to start the master at nofile 1024")
def test_two_thousand_idle_metrics_connections_do_not_starve_the_master(tmp_path):
    _raise_nofile(4096)
    port = free_port()
    cfg = http_config(port, tmp_path / "mp")
    with Daemon(tmp_path, cfg, wrap=("prlimit", "--nofile=1024:1024")).start() as d:
        held = open_idle(cfg["metrics"]["listen"], 2000)  # type: ignore[index]
        try:
            load = Load("127.0.0.1", port, threads=2, max_seconds=60).start("http")
            assert load.wait_for_ok(50)
            for n in (2, 3):
                d.reload_to(n)
            result = load.stop()
            assert result.failures == {}, (result.failures, result.examples)
            out = subprocess.run([sys.executable, "-m", "upgraderd", "status", "--pidfile", str(d.pidfile)],
                                 cwd=ROOT, capture_output=True, text=True, timeout=30)
            assert out.returncode == 0 and "generation 3" in out.stdout, out
            assert len(os.listdir(f"/proc/{d.pid}/fd")) < 200
            before = cpu_seconds(d.pid)
            time.sleep(2.0)  # a measurement window, not a wait for a condition
            assert cpu_seconds(d.pid) - before < 0.5, "the master spun while the connections were held"
        finally:
            for s in held:
                s.close()
        s = scrape(cfg)
        # 64 are held at a time; a 65th takes the place of the oldest one still waiting for its
        # head (expired), and an idle one is cut 2 s after its accept (expired): each of the
        # 2,000 is counted once at most, and all but the last 64 at least.
        cut = value(s, "upgraderd_metrics_connections_refused_total") + \
            value(s, "upgraderd_metrics_connections_expired_total")
        assert 2000 - 64 <= cut <= 2000
        assert "Too many open files" not in d.log()


def test_a_restarted_master_removes_the_metrics_dir_of_a_killed_one(tmp_path):
    port = free_port()
    cfg = echo_config(port, count=1)
    cfg["workers"] = {"count": 1, "app": "http"}
    first = Daemon(tmp_path, cfg).start()
    killed = first.pid
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(f"upgraderd-metrics-{killed}-")]
    assert len(stale) == 1
    first.stop(signal.SIGKILL)
    assert (tmp_path / stale[0]).is_dir()  # a SIGKILLed master cannot clean up
    with Daemon(tmp_path, cfg).start() as second:
        second.wait_log(r"removed 1 metrics directory of masters that are gone")
        mine = [p.name for p in tmp_path.iterdir() if p.name.startswith("upgraderd-metrics-")]
        assert len(mine) == 1 and mine[0].startswith(f"upgraderd-metrics-{second.pid}-")
