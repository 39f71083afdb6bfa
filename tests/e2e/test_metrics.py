"""The metrics endpoint of a real daemon: every number matches what happened."""

from __future__ import annotations

import os
import signal
import socket
import sys

import pytest

from tests.support import ROOT
from tests.support.loadgen import Load
from tests.support.scrape import fetch, metrics_url, scrape, value
from tests.support.upgraderd_proc import Daemon, echo_config, free_port, http_config, wait_until

pytestmark = pytest.mark.e2e

FIXTURE = str(ROOT / "tests" / "fixtures" / "echo_worker.py")
HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
MP_ENV = "UPGRADERD_METRICS_DIR"   # the built-in workers' metric files (contract/env.py)
PROM_ENV = "PROMETHEUS_MULTIPROC_DIR"   # prometheus-client's multiprocess switch: never in the master




def worker_env(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [x.decode(errors="replace").partition("=") for x in f.read().split(b"\0") if x]
    return {k: v for k, _, v in items}


def test_scrape_tracks_reloads_and_connections(tmp_path):
    port, mp = free_port(), tmp_path / "mp"
    cfg = http_config(port, mp)
    with Daemon(tmp_path, cfg).start() as d:
        assert fetch(metrics_url(cfg, "/healthz"))[0] == 200
        status, body, _ = fetch(metrics_url(cfg, "/readyz"))
        assert (status, body) == (200, "ok: generation 1 active\n")
        s = scrape(cfg)
        assert value(s, "upgraderd_generation") == 1
        assert value(s, "upgraderd_listener_info", name="web", address=f"127.0.0.1:{port}", mode="reuseport",
                     protocol="tcp") == 1
        assert value(s, "upgraderd_workers", state="ready") == 2
        for result in ("success", "failed", "rejected"):
            assert value(s, "upgraderd_reloads_total", result=result) == 0

        load = Load("127.0.0.1", port, threads=2, max_seconds=60).start("http")
        assert load.wait_for_ok(300)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        ok = result.ok

        def counted() -> dict | None:
            s = scrape(cfg)  # a busy worker writes its counts every 20 ms: wait for opens and closes
            return s if value(s, "upgraderd_connections_accepted_total", listener="web") == ok \
                and value(s, "upgraderd_connections_closed_total", listener="web") == ok else None
        s = wait_until(counted, 10, f"connections_accepted_total and closed_total to reach {ok}")
        assert value(s, "upgraderd_connections_closed_total", listener="web") == ok
        assert value(s, "upgraderd_bytes_received_total", listener="web") == ok * len(HTTP_REQUEST)
        assert value(s, "upgraderd_bytes_sent_total", listener="web") > ok * len(b"HTTP/1.1 200 OK\r\n")
        assert value(s, "upgraderd_connections_active", listener="web", state="active") == 0

        for n in (2, 3, 4):
            d.reload_to(n)
        wait_until(lambda: all(f"generation {n} DRAINING -> RETIRED" in d.log() for n in (1, 2, 3)),
                   15, "generations 1-3 to retire")
        s = wait_until(lambda: (x := scrape(cfg)) and value(x, "upgraderd_drain_duration_seconds_count") == 3
                       and x, 10, "three drains to be observed")
        assert value(s, "upgraderd_generation") == 4
        assert value(s, "upgraderd_reloads_total", result="success") == 3
        assert value(s, "upgraderd_reload_duration_seconds_count") == 3
        assert value(s, "upgraderd_reload_duration_seconds_bucket", le="+Inf") == 3
        assert value(s, "upgraderd_worker_exits_total", reason="clean") == 6
        assert value(s, "upgraderd_generations", state="active") == 1
        assert value(s, "upgraderd_generations", state="draining") == 0
        # Six workers came and went; their counts live on in the archive.
        assert value(s, "upgraderd_connections_accepted_total", listener="web") == ok
        assert value(s, "upgraderd_bytes_received_total", listener="web") == ok * len(HTTP_REQUEST)
        # The archive is in the master's memory; each live worker makes its two files at its first
        # flush, within 0.5 s of READY=1 (apps/connmetrics.py: not on the path to READY).
        live = sorted(d.workers())
        want = sorted([*(f"counter_{p}.db" for p in live), *(f"gauge_livesum_{p}.db" for p in live)])
        wait_until(lambda: sorted(p.name for p in mp.iterdir()) == want, 5,
                   f"the metric files of exactly the live workers {live}")


def test_draining_connections_are_labelled_draining(tmp_path):
    port = free_port()
    # Without hand-off, so that the old generation keeps the connections while it drains.
    cfg = echo_config(port, count=2, drain={"timeout": "10s", "handoff": "off"})
    with Daemon(tmp_path, cfg).start() as d:
        held = []
        for i in range(4):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(b"hello%d" % i)
            assert c.recv(16) == b"hello%d" % i
            held.append(c)
        wait_until(lambda: value(scrape(cfg), "upgraderd_connections_active", listener="echo", state="active") == 4,
                   10, "4 active connections")
        d.reload_to(2)

        def moved() -> dict | None:
            s = scrape(cfg)
            return s if value(s, "upgraderd_connections_active", listener="echo", state="draining") == 4 else None
        s = wait_until(moved, 10, "the held connections to count as draining")
        assert value(s, "upgraderd_connections_active", listener="echo", state="active") == 0
        assert value(s, "upgraderd_generations", state="draining") == 1
        assert 1 <= value(s, "upgraderd_draining_workers") <= 2
        assert value(s, "upgraderd_drain_duration_seconds_count") == 0
        assert fetch(metrics_url(cfg, "/readyz"))[0] == 200
        for c in held:  # the draining generation still serves them
            c.sendall(b"again")
            assert c.recv(16) == b"again"
            c.close()

        def drained() -> dict | None:
            s = scrape(cfg)
            return s if value(s, "upgraderd_generations", state="draining") == 0 else None
        s = wait_until(drained, 15, "generation 1 to retire")
        assert value(s, "upgraderd_connections_active", listener="echo", state="draining") == 0
        assert value(s, "upgraderd_draining_workers") == 0
        assert value(s, "upgraderd_drain_duration_seconds_count") == 1
        assert value(s, "upgraderd_connections_accepted_total", listener="echo") == 4
        assert value(s, "upgraderd_bytes_received_total", listener="echo") == 4 * len(b"hello0again")


def fixture_config(port: int, *args: str) -> dict[str, object]:
    cfg = echo_config(port, count=2, ready={"timeout": "3s"})
    cfg["workers"] = {"count": 2, "command": [sys.executable, FIXTURE, *args]}
    return cfg


def test_failed_reloads_rejections_and_crashes_are_counted(tmp_path):
    port = free_port()
    good = echo_config(port, count=2)
    with Daemon(tmp_path, good).start() as d:
        started_at = value(scrape(good), "upgraderd_config_last_reload_success_timestamp_seconds")
        d.write_config("listeners: [{name: echo, port: 0}]\n")
        d.send(signal.SIGHUP)
        d.wait_log(r"reload failed, still serving generation 1", count=1)
        s = scrape(good)
        assert value(s, "upgraderd_reloads_total", result="rejected") == 1
        assert value(s, "upgraderd_config_last_reload_successful") == 0
        assert value(s, "upgraderd_config_last_reload_success_timestamp_seconds") == started_at

        d.write_config(fixture_config(port, "--exit", "3") | {"metrics": good["metrics"]})
        d.send(signal.SIGHUP)
        d.wait_log(r"reload failed, still serving generation 1", count=2)
        d.write_config(fixture_config(port, "--garbage") | {"metrics": good["metrics"]})
        d.send(signal.SIGHUP)
        d.wait_log(r"reload failed, still serving generation 1", count=3)
        s = scrape(good)
        assert value(s, "upgraderd_reloads_total", result="failed") == 2
        assert value(s, "upgraderd_worker_exits_total", reason="error") >= 1
        assert value(s, "upgraderd_notify_rejected_total") >= 1
        assert d.log().count("ignored bad notify message") == 1   # rate-limited: one line per burst
        assert value(s, "upgraderd_generation") == 1
        assert fetch(metrics_url(good, "/readyz"))[0] == 200

        d.write_config(good)
        d.reload_to(4)
        s = scrape(good)
        assert value(s, "upgraderd_reloads_total", result="success") == 1
        assert value(s, "upgraderd_config_last_reload_successful") == 1
        assert value(s, "upgraderd_config_last_reload_success_timestamp_seconds") > started_at

        wait_until(lambda: len(d.workers()) == 2, 10, "only generation 4's workers")
        killed_before = value(s, "upgraderd_worker_exits_total", reason="signal")
        os.kill(min(d.workers()), signal.SIGKILL)
        d.wait_log(r"generation 4 slot \d: respawning(?:\n|$)")
        s = wait_until(lambda: (x := scrape(good)) and value(x, "upgraderd_workers", state="ready") == 2 and x,
                       10, "the slot to be ready again")
        assert value(s, "upgraderd_worker_restarts_total") == 1
        assert value(s, "upgraderd_worker_exits_total", reason="signal") == killed_before + 1
        assert value(s, "upgraderd_drain_timeouts_total") == 0


def test_metrics_address_in_use_exits_3_naming_it(tmp_path):
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        d = Daemon(tmp_path, echo_config(port, metrics={"listen": f"127.0.0.1:{taken}"})).start(wait=False)
        try:
            assert d.proc.wait(20) == 3
        finally:
            d.stop()
        log = d.log()
        assert f"cannot start: cannot serve metrics on 127.0.0.1:{taken} (metrics.listen): Address already in use" in log
        assert "STARTING:" not in log


def test_multiproc_dir_is_only_in_builtin_workers_env(tmp_path, monkeypatch):
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    monkeypatch.setenv(PROM_ENV, str(bogus))
    port = free_port()
    cfg = echo_config(port, count=2)
    with Daemon(tmp_path, cfg).start() as d:
        d.wait_log(rf"ignoring {PROM_ENV} from the environment")
        mp = d.wait_log(r"worker files in (\S+)\)")[0].group(1)
        assert mp != str(bogus)
        for pid in d.workers():
            assert worker_env(pid)[MP_ENV] == mp
            assert PROM_ENV not in worker_env(pid)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"x")
            assert c.recv(1) == b"x"
        wait_until(lambda: value(scrape(cfg), "upgraderd_connections_accepted_total", listener="echo") == 1,
                   10, "the connection to be counted")
        assert list(bogus.iterdir()) == []
        # A user's command does not get the variable: its metrics setup is its own.
        d.write_config(fixture_config(port) | {"metrics": cfg["metrics"]})
        d.reload_to(2)
        wait_until(lambda: len(d.workers()) == 2, 10, "generation 1 to go")
        for pid in d.workers():
            assert MP_ENV not in worker_env(pid)
    assert not os.path.exists(mp)  # the private directory is removed at exit


def test_metrics_disabled(tmp_path):
    port = free_port()
    with Daemon(tmp_path, echo_config(port, count=1, metrics={"listen": None})).start() as d:
        d.wait_log(r"metrics disabled \(metrics.listen is null\)")
        (pid,) = d.workers()
        assert MP_ENV not in worker_env(pid)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"still serves")
            assert c.recv(32) == b"still serves"


def test_a_reload_keeps_the_endpoint_where_it_is(tmp_path):
    port = free_port()
    cfg = echo_config(port, count=1)
    moved = echo_config(port, count=1)  # another free metrics port
    with Daemon(tmp_path, cfg).start() as d:
        d.write_config(moved)
        d.reload_to(2)
        d.wait_log(r"metrics settings changed .* take effect when the master restarts")
        assert value(scrape(cfg), "upgraderd_generation") == 2
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(tuple(moved["metrics"]["listen"].split(":")), timeout=5)  # type: ignore[index]
