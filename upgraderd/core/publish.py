"""The published view of the master, and the metrics endpoint that serves it, owned together.

Each pass of the loop ends with a `Snapshot` (core/snapshot.py) that the
master publishes here by rebinding one attribute (atomic in CPython); the
metrics thread reads only that reference. The `Publisher` starts the metrics
endpoint (through the `MetricsStarter` it is built with: metrics/telemetry.py
in production, none in unit tests) and is the one that closes it, at the
master's exit. It subscribes to reaped workers to fold their metric files.

Hazard: the endpoint serves from another thread. Everything it reads is the
published snapshot, a private copy, never the owners' live state.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from upgraderd.config.schema import Config, MetricsSpec
from upgraderd.core import events as ev
from upgraderd.core.requestcounts import RequestCounts
from upgraderd.core.seams import MetricsAPI
from upgraderd.core.snapshot import Snapshot

# Start the metrics endpoint: (spec, source of the latest view, clock, a USR2 predecessor's export).
MetricsStarter = Callable[[MetricsSpec, Callable[[], "Snapshot | None"], Callable[[], float],
                           "dict[str, object] | None"], "MetricsAPI | None"]


class Publisher:
    """The latest snapshot, and the metrics endpoint that serves it."""

    def __init__(self, starter: MetricsStarter | None, clock: Callable[[], float], bus: ev.Bus,
                 inherited: dict[str, object] | None = None) -> None:
        self.starter, self.clock, self.inherited = starter, clock, inherited
        self.metrics: MetricsAPI | None = None
        self.published: Snapshot | None = None
        bus.subscribe(ev.WorkerExited, self._reaped)

    def start(self, spec: MetricsSpec) -> None:
        """Start the endpoint for `spec` (None: no endpoint); raise FatalError if it cannot serve."""
        if self.starter is not None:
            self.metrics = self.starter(spec, lambda: self.published, self.clock, self.inherited)

    def publish(self, snap: Snapshot) -> None:
        """Make `snap` what the endpoint reports from now on."""
        self.published = snap

    def worker_env(self, cfg: Config) -> Mapping[str, str]:
        """Return the environment a worker of `cfg` needs to report its metrics."""
        return self.metrics.worker_env(cfg) if self.metrics is not None else {}

    def read_requests(self, pids: Sequence[int]) -> Mapping[int, RequestCounts]:
        """Return the request counts of worker `pids` ({} without an endpoint: no files are read)."""
        return self.metrics.read_requests(pids) if self.metrics is not None else {}

    def check_reload(self, cfg: Config) -> None:
        """Warn about metrics settings only a restart applies."""
        if self.metrics is not None:
            self.metrics.check_reload(cfg)

    def export(self) -> dict[str, object] | None:
        """Return what a re-exec'd master needs to carry the metrics on."""
        return self.metrics.export() if self.metrics is not None else None

    def close(self) -> None:
        """Stop the endpoint and release the worker files (at the master's exit)."""
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def _reaped(self, event: ev.WorkerExited) -> None:
        if self.metrics is not None:
            self.metrics.on_reaped(event.pid)
