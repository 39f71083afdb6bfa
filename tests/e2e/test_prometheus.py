"""A real Prometheus server scrapes the daemon through 5 reloads under load and sees no counter reset."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.loadgen import Load
from tests.support.promtools import tool
from tests.support.upgraderd_proc import Daemon, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e

RELOADS = 5


class Prometheus:
    """A Prometheus server on loopback, scraping one target every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "upgraderd", "static_configs": [{"targets": [target]}]}],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.data = workdir / "data"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={self.config_path}", f"--storage.tsdb.path={self.data}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        wait_until(lambda: self._ready(), 60, "Prometheus to be ready", interval=0.2)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Run an instant query; return its result vector (or matrix)."""
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        url = f"http://127.0.0.1:{self.port}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{expr}: {e.code} {e.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]["result"]  # type: ignore[no-any-return]

    def scalar(self, expr: str, at: float | None = None) -> float | None:
        """Return the single value of `expr`, or None if it has no result."""
        result = self.query(expr, at)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_prometheus_sees_counters_carry_on_across_reloads(tmp_path):
    port, metrics_port = free_port(), free_port()
    cfg = echo_config(port, count=2, metrics={"listen": f"127.0.0.1:{metrics_port}"})
    prom = Prometheus(tmp_path, f"127.0.0.1:{metrics_port}")
    with Daemon(tmp_path, cfg).start() as d:
        prom.start()
        try:
            load = Load("127.0.0.1", port, threads=2, max_seconds=120).start("echo")
            assert load.wait_for_ok(100)
            wait_until(lambda: (prom.scalar('sum(upgraderd_connections_accepted_total{job="upgraderd"})') or 0) > 0,
                       30, "Prometheus to scrape the daemon under load", interval=0.2)
            t_start = time.time()
            assert prom.scalar('upgraderd_reloads_total{result="success"}', t_start) == 0
            for n in range(2, RELOADS + 2):
                d.send(signal.SIGHUP)
                d.wait_log(rf"reload done: generation {n} ACTIVE")
                # Let Prometheus scrape each generation, so every worker set is seen and replaced.
                wait_until(lambda: prom.scalar("upgraderd_generation") == n, 30,
                           f"Prometheus to see generation {n}", interval=0.1)
            wait_until(lambda: prom.scalar('upgraderd_reloads_total{result="success"}') == RELOADS, 30,
                       "Prometheus to see every reload", interval=0.1)
            t_end = time.time()
            result = load.stop()
            window = f"{math.ceil(t_end - t_start) + 1}s"

            assert result.failures == {}, (result.failures, result.examples)
            assert prom.scalar('upgraderd_reloads_total{result="success"}', t_end) == RELOADS
            # No series of any upgraderd counter was reset in the window, worker counters included.
            counters = prom.query(f'count by (__name__) ({{__name__=~"upgraderd_.+_total", job="upgraderd"}})', t_end)
            names = {r["metric"]["__name__"] for r in counters}
            assert {"upgraderd_reloads_total", "upgraderd_connections_accepted_total",
                    "upgraderd_bytes_received_total", "upgraderd_worker_exits_total"} <= names
            for name in sorted(names):
                resets = prom.query(f'resets({name}{{job="upgraderd"}}[{window}])', t_end)
                assert resets and all(r["value"][1] == "0" for r in resets), (name, resets)
            # The raw samples Prometheus stored only grow, and increase() agrees with them.
            for sel in ('upgraderd_connections_accepted_total{job="upgraderd"}',
                        'upgraderd_bytes_sent_total{job="upgraderd"}',
                        'upgraderd_reloads_total{job="upgraderd",result="success"}'):
                (series,) = prom.query(f"{sel}[{window}]", t_end)
                values = [float(v) for _, v in series["values"]]
                assert values == sorted(values) and values[-1] > values[0], (sel, values)
                raw = values[-1] - values[0]
                inc = prom.scalar(f"increase({sel}[{window}])", t_end)
                # increase() extrapolates to the window's edges (at most 1.1 intervals per
                # side), but a reset would add the whole pre-reset count on top.
                n = len(values)
                assert raw <= inc <= raw * (n + 1.2) / (n - 1) + 1e-9, (sel, raw, inc, n)
            assert values[0] == 0 and values[-1] == RELOADS
        finally:
            prom.stop()
