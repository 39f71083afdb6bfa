"""Request metrics of an `asgi:`/`wsgi:` worker, in the workers' metric files (docs/metrics.md).

- `upgraderd_http_requests_total{listener, status_class}`: answered requests,
  `status_class` one of `1xx` ... `5xx` (a request refused without the app,
  such as a 400 for a malformed one, counts too);
- `upgraderd_http_request_duration_seconds{listener}`: a histogram from the
  end of the request head to the end of the response;
- `upgraderd_websockets_open{listener, state}`: open WebSockets, `state`
  `active` or `draining` like `upgraderd_connections_active` (livesum: a
  worker's share leaves with it).

Labels are bounded (the listeners of the config, five classes, two states):
no pid, no generation number (it grows without end; the state says whether a
WebSocket is held by a draining generation), no path.

The built-in `http` app counts the same two series through this class
(apps/httpcounts.py), so the rollouts' traffic checks read every HTTP worker
alike; it has no WebSockets and passes `websockets=None` to `flush`.

Design note: a request costs a `bisect` and three list increments in the
event loop; `flush()` writes what changed at the server's tick (every 0.5 s,
every 50 ms while draining) and at exit, so a worker killed with SIGKILL loses
at most its last tick of counts. Only the event loop's thread writes here
(the WSGI pool threads never do); the file writes hold `metricfile.WRITE_LOCK`,
as connmetrics' do, since `metricfile.shared` gives both one `MetricFile` per
path and a built-in worker with `threads: N` writes from N threads.

A worker that cannot create the histogram file reports without it (and says
so once); without `UPGRADERD_METRICS_DIR` nothing is recorded.
"""

from __future__ import annotations

import os
from bisect import bisect_left

from upgraderd.apps import logline, metricfile
from upgraderd.contract import metricformat as layout
from upgraderd.contract.env import METRICS_DIR

BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
REQUESTS = ("upgraderd_http_requests", "HTTP requests answered by the asgi:/wsgi: workers, by status class.")
DURATION = ("upgraderd_http_request_duration_seconds", "From a request's head to the end of its response, "
            "in the asgi:/wsgi: workers.")
WEBSOCKETS = ("upgraderd_websockets_open", "Open WebSockets of the asgi: workers, by the state of their "
              "generation (active or draining).")
_FILE_SIZE = 1 << 16
BUCKET = 6                               # the first bucket's index in a listener's slot
SUM = BUCKET + len(BOUNDS) + 1           # the sum's
SIZE = SUM + 1


class RequestMetrics:
    """This worker's request counts, duration histogram and open WebSockets, per listener."""

    def __init__(self, listeners: list[str], enabled: bool) -> None:
        self.enabled = enabled
        # Per listener one list: counts by status // 100 at 1..5, the buckets from BUCKET (+Inf last), the sum.
        self.slots: dict[str, list[float]] = {}
        self._flushed: dict[str, list[float]] = {}
        self._ws_reported: dict[tuple[str, str], int] = {}
        self._files: tuple[metricfile.MetricFile, metricfile.MetricFile | None, metricfile.MetricFile] | None = None
        if enabled:
            self._files = _open_files()
            self.enabled = self._files is not None
        for name in listeners:
            self.add_listener(name)

    def add_listener(self, name: str) -> None:
        """Count the requests of listener `name` too, each series from 0 (rate() and increase() see its start)."""
        if name in self.slots:
            return
        self.slots[name], self._flushed[name] = [0.0] * SIZE, [0.0] * SIZE
        if self._files is None:
            return
        with metricfile.WRITE_LOCK:
            for status_class in CLASSES[1:]:
                self._files[0].add(_requests(name, status_class), 0)
            histograms = self._files[1]
            if histograms is not None:   # every bucket, so that each bound shows (cumulative) from the start
                for i in range(len(BOUNDS) + 1):
                    histograms.add(_bucket(name, i), 0)
                histograms.add(_sum(name), 0)

    def request(self, listener: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        slot = self.slots.get(listener)
        if slot is not None:
            k = status // 100
            slot[k if 0 < k < 6 else 5] += 1
            slot[BUCKET + bisect_left(BOUNDS, seconds)] += 1
            slot[SUM] += seconds

    def flush(self, websockets: dict[str, int] | None, draining: bool) -> None:
        """Write what changed since the last flush; `websockets` is the open ones per listener now
        (None: this worker has none, and no gauge)."""
        if self._files is None:
            return
        with metricfile.WRITE_LOCK:
            self._write(self._files, websockets, draining)

    def _write(self, files: tuple[metricfile.MetricFile, metricfile.MetricFile | None, metricfile.MetricFile],
               websockets: dict[str, int] | None, draining: bool) -> None:
        counters, histograms, gauges = files
        for name, slot in self.slots.items():
            before = self._flushed[name]
            if slot == before:
                continue
            # The durations first: the master reads the files without a lock, and a scrape
            # between the two writes then never sees a request counted that is not observed.
            if histograms is not None:
                for i in range(BUCKET, SUM):
                    if slot[i] != before[i]:
                        histograms.add(_bucket(name, i - BUCKET), slot[i] - before[i])
                histograms.add(_sum(name), slot[SUM] - before[SUM])
            for i in range(1, BUCKET):
                if slot[i] != before[i]:
                    counters.add(_requests(name, CLASSES[i - 1]), slot[i] - before[i])
            self._flushed[name] = list(slot)
        if websockets is None:
            return
        for name in self.slots:
            open_now = websockets.get(name, 0)
            for state, want in (("active", 0 if draining else open_now), ("draining", open_now if draining else 0)):
                was = self._ws_reported.get((name, state))
                if was != want:
                    gauges.add(metricfile.key(WEBSOCKETS[0], WEBSOCKETS[0], {"listener": name, "state": state},
                                              WEBSOCKETS[1]), want - (was or 0))
                    self._ws_reported[(name, state)] = want


def _requests(listener: str, status_class: str) -> str:
    return metricfile.key(REQUESTS[0], REQUESTS[0] + "_total", {"listener": listener, "status_class": status_class},
                          REQUESTS[1])


def _bucket(listener: str, i: int) -> str:
    le = repr(BOUNDS[i]) if i < len(BOUNDS) else "+Inf"
    return metricfile.key(DURATION[0], DURATION[0] + "_bucket", {"listener": listener, "le": le}, DURATION[1])


def _sum(listener: str) -> str:
    return metricfile.key(DURATION[0], DURATION[0] + "_sum", {"listener": listener}, DURATION[1])


def _open_files() -> tuple[metricfile.MetricFile, metricfile.MetricFile | None, metricfile.MetricFile] | None:
    """Return this worker's counter, histogram and livesum gauge files (connmetrics allocated two of them)."""
    directory = os.environ.get(METRICS_DIR, "")
    try:
        counters = metricfile.shared(os.path.join(directory, layout.file_name("counter", os.getpid())))
        gauges = metricfile.shared(os.path.join(directory, layout.file_name("gauge_livesum", os.getpid())))
    except OSError:
        return None   # connmetrics said why on stderr
    path = os.path.join(directory, layout.file_name("histogram", os.getpid()))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            if os.fstat(fd).st_size < _FILE_SIZE:
                os.posix_fallocate(fd, 0, _FILE_SIZE)   # whole, so that a full disk fails here, not as SIGBUS
        finally:
            os.close(fd)
        return counters, metricfile.shared(path), gauges
    except OSError as e:
        logline.log(f"upgraderd worker {os.getpid()}: request duration histogram disabled, cannot write {path}: "
                    f"{e.strerror or e}", "WARNING")
        return counters, None, gauges
