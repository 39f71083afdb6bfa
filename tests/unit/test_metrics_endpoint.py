"""The master's collector and HTTP endpoint, driven by hand-made snapshots and a fake clock."""

from __future__ import annotations

import gzip
import socket
import urllib.request

import pytest
from prometheus_client import REGISTRY, generate_latest

from tests.support.scrape import fetch, parse, value
from upgraderd.config.schema import MetricsSpec, parse as parse_config
from upgraderd.core.durations import RELOAD_BUCKETS, DRAIN_BUCKETS, Durations
from upgraderd.errors import FatalError
from upgraderd.metrics.telemetry import STALL_AFTER, Telemetry
from upgraderd.core.generation import GenerationState as G, WorkerState as W
from upgraderd.core.snapshot import GenerationInfo, ListenerInfo, Snapshot, WorkerInfo
from upgraderd.core.stats import Stats


def snapshot(taken_at: float = 100.0, active: int = 3, stopping: bool = False) -> Snapshot:
    stats = Stats(reloads={"success": 2, "failed": 1, "rejected": 4},
                  worker_exits={"clean": 9, "error": 1, "signal": 2}, worker_restarts=5,
                  notify_rejected=6, drain_timeouts=7, last_reload_ok=False,
                  last_reload_success_at=1.7e9, slot_retire_risks=8)
    for v in (0.2, 0.3, 7.0):
        stats.reload_durations.observe(v)

    def workers(state: W, n: int, first: int) -> tuple[WorkerInfo, ...]:
        return tuple(WorkerInfo(first + i, 100 + first + i, state, 0.0) for i in range(n))

    gens = (
        GenerationInfo(active - 2, G.DRAINING, 0.0, 0.0, "", workers(W.DRAINING, 2, 0)),
        GenerationInfo(active - 1, G.DRAINING, 0.0, 0.0, "", workers(W.DRAINING, 1, 2) + workers(W.EXITED, 1, 3)),
        GenerationInfo(active, G.ACTIVE if active else G.FAILED, 0.0, 0.0, "", workers(W.READY, 4, 4)),
    )
    return Snapshot(taken_at=taken_at, wall_offset=0.0, config_path="/etc/u.yaml", started_at=1.6e9,
                    generation_list=gens if active else gens[:2], listeners=(ListenerInfo("web", "[::1]:8080", "shared", "udp"),),
                    stats=stats, stopping=stopping, tcp_migrate_req=0, worker_bind_reset_risk=True)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def endpoint():
    state = {"snap": snapshot()}
    clock = Clock(101.0)
    t = Telemetry.start(MetricsSpec(listen="127.0.0.1:0"), lambda: state["snap"], clock)
    assert t is not None
    yield t, state, clock, f"http://{t.server.address}"
    t.close()


def test_metrics_are_computed_from_the_snapshot(endpoint):
    t, state, clock, url = endpoint
    status, body, headers = fetch(url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    s = parse(body)
    assert value(s, "upgraderd_generation") == 3
    assert value(s, "upgraderd_generations", state="draining") == 2
    assert ("upgraderd_generations", (("state", "retired"),)) not in s
    assert value(s, "upgraderd_workers", state="exited") == 1
    assert value(s, "upgraderd_draining_workers") == 3
    assert value(s, "upgraderd_listener_info", name="web", address="[::1]:8080", mode="shared", protocol="udp") == 1
    assert value(s, "upgraderd_reloads_total", result="rejected") == 4
    assert value(s, "upgraderd_worker_exits_total", reason="signal") == 2
    assert value(s, "upgraderd_worker_restarts_total") == 5
    assert value(s, "upgraderd_notify_rejected_total") == 6
    assert value(s, "upgraderd_drain_timeouts_total") == 7
    assert value(s, "upgraderd_config_last_reload_successful") == 0
    assert value(s, "upgraderd_config_last_reload_success_timestamp_seconds") == 1.7e9
    assert value(s, "upgraderd_reload_duration_seconds_bucket", le="0.25") == 1
    assert value(s, "upgraderd_reload_duration_seconds_bucket", le="0.5") == 2
    assert value(s, "upgraderd_reload_duration_seconds_bucket", le="+Inf") == 3
    assert value(s, "upgraderd_reload_duration_seconds_count") == 3
    assert value(s, "upgraderd_reload_duration_seconds_sum") == pytest.approx(7.5)
    assert value(s, "upgraderd_drain_duration_seconds_count") == 0
    assert ("process_cpu_seconds_total", ()) in s
    assert any(k[0] == "upgraderd_build_info" for k in s)
    assert not any("pid" in dict(k[1]) for k in s)
    assert b"upgraderd_" not in generate_latest(REGISTRY)  # nothing on the global registry
    # Gauges follow the state: a new snapshot, new values, no drift.
    state["snap"] = snapshot(active=0)
    assert value(parse(fetch(url + "/metrics")[1]), "upgraderd_generation") == 0


def test_openmetrics_and_gzip_are_negotiated(endpoint):
    t, state, clock, url = endpoint
    status, body, headers = fetch(url + "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    assert "# TYPE upgraderd_build info" in body
    req = urllib.request.Request(url + "/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert b"upgraderd_generation 3.0" in gzip.decompress(r.read())


def test_health_and_readiness_follow_the_loop_and_the_active_generation(endpoint):
    t, state, clock, url = endpoint
    assert fetch(url + "/healthz")[:2] == (200, "ok: generation 3 active\n")
    assert fetch(url + "/readyz")[:2] == (200, "ok: generation 3 active\n")
    state["snap"] = snapshot(active=0)
    assert fetch(url + "/healthz")[0] == 200
    assert fetch(url + "/readyz")[:2] == (503, "not ok: no ACTIVE generation\n")
    state["snap"] = snapshot(stopping=True)
    assert fetch(url + "/readyz")[:2] == (503, "not ok: stopping\n")
    clock.now = 100.0 + STALL_AFTER + 5
    assert fetch(url + "/healthz")[:2] == (503, f"not ok: master loop stalled for {STALL_AFTER + 5:.0f}s\n")
    assert fetch(url + "/readyz")[0] == 503
    assert fetch(url + "/other")[0] == 404


def test_no_snapshot_yet_means_starting():
    t = Telemetry.start(MetricsSpec(listen="127.0.0.1:0"), lambda: None, Clock(0.0))
    assert t is not None
    try:
        url = f"http://{t.server.address}"
        assert fetch(url + "/healthz")[:2] == (503, "not ok: starting\n")
        s = parse(fetch(url + "/metrics")[1])
        assert not any(k[0] == "upgraderd_generation" for k in s)
    finally:
        t.close()


def test_a_broken_collector_answers_500_and_the_endpoint_lives_on(endpoint):
    t, state, clock, url = endpoint
    state["snap"] = "not a snapshot"
    status, body, _ = fetch(url + "/metrics")
    assert status == 500 and body.startswith("metrics collection failed:")
    state["snap"] = snapshot()
    assert fetch(url + "/metrics")[0] == 200


def test_a_busy_address_is_a_fatal_error_naming_it():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = "127.0.0.1:%d" % busy.getsockname()[1]
        with pytest.raises(FatalError, match=rf"cannot serve metrics on {addr} \(metrics.listen\): "
                                             "Address already in use"):
            Telemetry.start(MetricsSpec(listen=addr), lambda: None, Clock(0.0))


def test_ipv6_loopback():
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 on this machine")
    t = Telemetry.start(MetricsSpec(listen="[::1]:0"), lambda: snapshot(), Clock(100.0))
    assert t is not None
    try:
        assert t.server.address.startswith("[::1]:")
        assert fetch(f"http://{t.server.address}/readyz")[0] == 200
    finally:
        t.close()


def test_disabled_and_builtin_only_env(tmp_path):
    assert Telemetry.start(MetricsSpec(listen=None), lambda: None, Clock(0.0)) is None
    t = Telemetry.start(MetricsSpec(listen="127.0.0.1:0", dir=str(tmp_path / "mp")), lambda: None, Clock(0.0))
    assert t is not None
    try:
        app = parse_config("listeners: [{name: a, port: 1}]\nworkers: {app: echo}\n")
        cmd = parse_config("listeners: [{name: a, port: 1}]\nworkers: {command: [/bin/true]}\n")
        assert t.worker_env(app) == {"UPGRADERD_METRICS_DIR": str(tmp_path / "mp")}
        assert t.worker_env(cmd) == {}
    finally:
        t.close()
