"""The publisher owns the metrics endpoint: it starts it with the master, folds reaped workers' files
through it, and is the one that closes it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tests.support.fakes import FakeClock, FakeNotify, FakeProcessAPI, fake_system
from tests.support.upgraderd_proc import free_port
from upgraderd.config.schema import Config, MetricsSpec
from upgraderd.core.master import assemble
from upgraderd.core.snapshot import Snapshot


class FakeMetrics:
    """A `MetricsAPI` that records what the master asks of it."""

    def __init__(self, source: Callable[[], Snapshot | None]) -> None:
        self.source = source
        self.reaped: list[int] = []
        self.closed = 0

    def worker_env(self, cfg: Config) -> dict[str, str]:
        return {"METRICS_DIR": "/nowhere"}

    def on_reaped(self, pid: int) -> None:
        self.reaped.append(pid)

    def check_reload(self, cfg: Config) -> None:
        pass

    def export(self) -> dict[str, object]:
        return {}

    def close(self) -> None:
        self.closed += 1


def test_the_publisher_starts_feeds_and_closes_the_metrics_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "u.yaml"
    path.write_text(f"listeners: [{{name: web, host: 127.0.0.1, port: {free_port()}}}]\n"
                    "workers: {count: 1, app: echo}\nkernel: {tcp_migrate_req: ignore}\n")
    started: list[FakeMetrics] = []

    def start(spec: MetricsSpec, source: Callable[[], Snapshot | None], clock: Callable[[], float],
              inherited: dict[str, object] | None) -> FakeMetrics:
        started.append(FakeMetrics(source))
        return started[-1]

    procs, note = FakeProcessAPI(), FakeNotify()
    m = assemble(str(path), fake_system(procs, note), clock=FakeClock(100.0), metrics=start)
    m.start()
    (metrics,) = started
    assert procs.spawns[0].env["METRICS_DIR"] == "/nowhere"
    assert metrics.source() is None                      # nothing published before the first pass
    note.ready(*procs.pids())
    m.step(set())
    snap = metrics.source()
    assert snap is not None and snap.active_generation == 1
    procs.exit(procs.pids()[0], code=1)
    m.step(set())
    assert metrics.reaped == [1000]
    m.close()
    m.close()
    assert metrics.closed == 1
    m.system.listeners.close_all()
    m.system.probes.close()
