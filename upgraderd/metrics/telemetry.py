"""upgraderd's Prometheus metrics: what the master reports and how they reach /metrics.

Design note: nothing here holds a metric value of its own. Gauges and the
master's counters are computed at scrape time from the latest `Snapshot` the
loop published (client_python's custom-collector pattern), so they cannot
drift from the state they describe and need no lock. The workers' connection
counters come from their metric files (see multiproc.py). Everything is
registered on a private `CollectorRegistry` built by `Telemetry.start()`;
nothing touches prometheus-client's global registry, and importing this
module configures nothing.

The names are an interface (dashboards and alerts query them); docs/metrics.md
documents each one. No label takes a pid or any other unbounded value.
"""

from __future__ import annotations

import logging
import platform
import signal
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric,
)

from upgraderd import __version__
from upgraderd.config.schema import Config, MetricsSpec
from upgraderd.core.durations import HistogramData
from upgraderd.core.requestcounts import RequestCounts
from upgraderd.core.stats import counters
from upgraderd.metrics import requestfiles
from upgraderd.metrics.endpoint import MetricsServer
from upgraderd.errors import FatalError
from upgraderd.metrics.multiproc import ENV, WorkerFiles
from upgraderd.system.signals import HANDLED
from upgraderd.core.snapshot import Snapshot

log = logging.getLogger("upgraderd")

# The master's loop passes at least once a second; a snapshot this old means
# the loop is stuck, and /healthz says so.
STALL_AFTER = 10.0


class UpgraderdCollector:
    """Compute the master's metrics from the latest snapshot, at scrape time."""

    def __init__(self, source: Callable[[], Snapshot | None]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family of the master."""
        build = InfoMetricFamily("upgraderd_build", "Version of upgraderd and of the Python running the master.")
        build.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield build
        snap = self.source()
        if snap is None:
            return
        yield from self._state(snap)
        yield from self._events(snap)
        yield _histogram("upgraderd_reload_duration_seconds",
                         "Time from the HUP to the new generation being ACTIVE, for successful reloads.",
                         snap.stats.reload_durations.data())
        yield _histogram("upgraderd_drain_duration_seconds",
                         "Time from ACTIVE -> DRAINING to the generation's last worker exiting.",
                         snap.stats.drain_durations.data())

    def _state(self, snap: Snapshot) -> Iterator[Metric]:
        yield GaugeMetricFamily("upgraderd_generation", "Number of the ACTIVE generation (0 while there is none).",
                                value=snap.active_generation)
        yield GaugeMetricFamily("upgraderd_serving_release", "The generation whose release (code) the ACTIVE "
                                "generation runs: its own number, or a rollback's kept one (0: none serves).",
                                value=snap.serving_release)
        yield GaugeMetricFamily("upgraderd_rollout_waiting_for_operator", "1 while a canary whose check failed is "
                                "held for `upgraderd promote` or `upgraderd rollback` (rollback: manual), else 0.",
                                value=1 if snap.rollout is not None and snap.rollout.held else 0)
        yield GaugeMetricFamily("upgraderd_previous_release_kept", "The generation whose release's template is "
                                "kept for `upgraderd rollback` (rollout.keep_previous; 0: none).",
                                value=snap.previous.release if snap.previous is not None else 0)
        yield _by_label("upgraderd_generations", "Generations by state.", "state", snap.generations, gauge=True)
        yield _by_label("upgraderd_workers", "Worker slots by state, over every generation the master tracks.",
                        "state", snap.workers, gauge=True)
        yield GaugeMetricFamily("upgraderd_draining_workers",
                                "Worker processes asked to drain that have not exited yet.",
                                value=snap.draining_workers)
        info = InfoMetricFamily("upgraderd_listener", "One series per listener of the current config.",
                                labels=["name", "address", "mode", "protocol"])
        for li in snap.listeners:
            info.add_metric([li.name, li.address, li.mode, li.protocol], {})
        yield info
        yield GaugeMetricFamily("upgraderd_config_last_reload_successful",
                                "1 if the last reload (or the start) brought its config into service, else 0.",
                                value=1 if snap.stats.last_reload_ok else 0)
        yield GaugeMetricFamily("upgraderd_config_last_reload_success_timestamp_seconds",
                                "Unix time the config in service was loaded (start or successful reload).",
                                value=snap.last_reload_success_at)
        yield GaugeMetricFamily("upgraderd_kernel_tcp_migrate_req",
                                "net.ipv4.tcp_migrate_req as last read by the master (-1: not available).",
                                value=snap.tcp_migrate_req)
        yield GaugeMetricFamily("upgraderd_reuseport_foreign_listeners",
                                "Processes not this master's that listen on one of its TCP addresses (checked "
                                "every few seconds): they take a share of the new connections.",
                                value=len(snap.foreign_listeners))
        yield GaugeMetricFamily("upgraderd_worker_bind_reset_risk",
                                "1 while a worker-bind listener is configured and tcp_migrate_req is not 1: "
                                "a draining worker's queued connections can be reset.",
                                value=1 if snap.worker_bind_reset_risk else 0)

    def _events(self, snap: Snapshot) -> Iterator[Metric]:
        for spec in counters():
            value = getattr(snap.stats, spec.attr)
            if spec.label is None:
                yield CounterMetricFamily(spec.metric, spec.doc, value=value)
            else:
                yield _by_label(spec.metric, spec.doc, spec.label, value)


def _by_label(name: str, doc: str, label: str, values: dict[str, int], gauge: bool = False) -> Metric:
    family: GaugeMetricFamily | CounterMetricFamily
    family = GaugeMetricFamily(name, doc, labels=[label]) if gauge else CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _histogram(name: str, doc: str, data: HistogramData) -> Metric:
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], [(_le(bound), float(n)) for bound, n in data.buckets], sum_value=data.total)
    return family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def health(snap: Snapshot | None, now: float) -> tuple[bool, bool, str]:
    """Return (alive, ready, reason) for /healthz and /readyz from the latest snapshot."""
    if snap is None:
        return False, False, "starting"
    stalled = now - snap.taken_at
    alive = stalled < STALL_AFTER
    ready = alive and snap.ready_workers > 0 and not snap.stopping and not snap.foreign_listeners
    why = (f"generation {snap.active_generation} active" if ready else
           f"master loop stalled for {stalled:.0f}s" if not alive else
           "stopping" if snap.stopping else "no ACTIVE generation" if not snap.active_generation
           else f"no READY worker in generation {snap.active_generation}" if not snap.ready_workers
           else "a port group is shared: " + "; ".join(snap.foreign_listeners[:3]))
    return alive, ready, why


class WorkerCollector:
    """Expose the workers' multiprocess files (connection metrics), and what reading them cost."""

    def __init__(self, files: WorkerFiles) -> None:
        self.files = files
        self.errors = 0

    def collect(self) -> Iterable[Metric]:
        """Return the metrics summed over every worker, dead or alive; never raise."""
        try:
            metrics = list(self.files.collect())
        except Exception:  # worker-written input must never cost the master's own metrics
            self.errors += 1
            if self.errors == 1 or self.errors % 100 == 0:
                log.exception("collecting the workers' metrics failed (%d time(s))", self.errors)
            metrics = []
        rejected = CounterMetricFamily("upgraderd_metric_files_rejected",
                                       "Worker metric files set aside as untrusted, by the check they failed.",
                                       labels=["reason"])
        for reason, n in sorted(self.files.rejected.items()):
            rejected.add_metric([reason], n)
        metrics.append(rejected)
        metrics.append(GaugeMetricFamily("upgraderd_worker_metrics_enabled", "1 if the workers' metrics "
                                         "directory is usable, 0 if it could not be written at start.",
                                         value=1 if self.files.enabled else 0))
        return metrics


class EndpointCollector:
    """Expose what the endpoint did to protect the master from its clients."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        """Yield the endpoint's own counters."""
        counts = self.server.counts()
        yield CounterMetricFamily("upgraderd_metrics_connections_refused", "Connections to this endpoint "
                                  "closed at once because it already served its maximum.", value=counts["refused"])
        yield CounterMetricFamily("upgraderd_metrics_connections_expired", "Connections to this endpoint shut "
                                  "down because a request took longer than its deadline.", value=counts["expired"])
        yield CounterMetricFamily("upgraderd_metrics_accept_errors", "Failed accepts on this endpoint for lack "
                                  "of fds or memory; each sheds one connection and backs off.",
                                  value=counts["accept_errors"])


class Telemetry:
    """The master's metrics: registry, worker files and HTTP endpoint, started and stopped together."""

    def __init__(self, spec: MetricsSpec, files: WorkerFiles, registry: CollectorRegistry,
                 server: MetricsServer) -> None:
        self.spec = spec
        self.files = files
        self.registry = registry
        self.server = server

    @classmethod
    def start(cls, spec: MetricsSpec, source: Callable[[], Snapshot | None],
              clock: Callable[[], float], inherited: dict[str, object] | None = None) -> Telemetry | None:
        """Serve /metrics on `spec.listen`; raise FatalError naming the address if it cannot.

        `inherited` is the `export()` of the master this one was exec'd from.
        """
        if spec.listen is None:
            log.info("metrics disabled (metrics.listen is null)")
            return None
        files = WorkerFiles.adopt(inherited) if inherited else WorkerFiles(spec.dir)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(UpgraderdCollector(source))
        registry.register(WorkerCollector(files))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        try:
            server = MetricsServer(spec.listen, registry, lambda: health(source(), clock()))
        except OSError as e:
            files.close()
            raise FatalError(f"cannot serve metrics on {spec.listen} (metrics.listen): "
                             f"{e.strerror or e}") from None
        registry.register(EndpointCollector(server))
        # Threads inherit the signal mask: with these blocked, only the master's
        # main thread ever takes its signals (a USR2 exec relies on that).
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            server.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        log.info("metrics on http://%s/metrics (worker files in %s)", server.address, files.path)
        return cls(spec, files, registry, server)

    def export(self) -> dict[str, object]:
        """Return what a re-exec'd master passes to `start(inherited=...)`."""
        return self.files.export()

    def worker_env(self, cfg: Config) -> dict[str, str]:
        """Return the environment a worker of `cfg` needs to report its metrics."""
        # Only the built-in apps: a user's command keeps its own metrics setup.
        return {ENV: self.files.path} if cfg.workers.app is not None and self.files.enabled else {}

    def read_requests(self, pids: Sequence[int]) -> Mapping[int, RequestCounts]:
        """Return the request counts of worker `pids` (metrics/requestfiles.py)."""
        return requestfiles.read(self.files, pids)

    def on_reaped(self, pid: int) -> None:
        """Fold the files of a reaped worker into the archive."""
        try:
            self.files.fold(pid)
        except Exception:  # metrics must never take the master down
            log.exception("could not fold the metric files of pid %d", pid)

    def check_reload(self, cfg: Config) -> None:
        """Warn about metrics settings that only a restart applies."""
        if cfg.metrics != self.spec:
            log.warning("metrics settings changed (%s -> %s); they take effect when the master restarts",
                        self.spec, cfg.metrics)

    def close(self) -> None:
        """Stop the endpoint and release the worker files."""
        self.server.stop()
        self.files.close()
