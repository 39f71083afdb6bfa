"""A worker's own metric file, in upgraderd's layout (contract/metricformat.py).

The built-in workers report their connection counts in files named
`counter_<pid>.db`, `gauge_livesum_<pid>.db`, ... in $UPGRADERD_METRICS_DIR;
the master reads them with its own validating reader (metrics/dbfile.py) and
folds them when the worker exits. Any worker-side code may write counters,
gauges and histogram buckets through `MetricFile` (docs/metrics.md, "The
workers' metric files", shows how).

Design note: the workers used to write prometheus-client's multiprocess files
(first through its `Counter` and `Gauge`, then in its private `mmap_dict`
layout by hand). Importing prometheus-client costs about 40 ms of CPU (it
pulls in http.server, urllib, ssl and more for its exposition code), about a
third of what a prefork template does before it can fork, and its file layout
carries no stability promise. This writer does only what a worker needs:
append an entry the first time a series is set, then overwrite its value in
place, in a layout upgraderd owns.

Invariants:
- The file is opened with O_NOFOLLOW and mapped whole; it is allocated by the
  caller (`posix_fallocate`), and grows only through `posix_fallocate` too,
  so a full tmpfs fails a call (OSError) instead of faulting a later write.
- The `used` header is written after the entry it covers, so a reader never
  sees a half-written entry inside `used`.
- One `MetricFile` per path and process (`shared`), holding every series'
  value: two writers of one series in a process add up instead of
  overwriting each other. A forked child opens its own.
- Not thread-safe: the caller holds `WRITE_LOCK`, one per process, which
  every writer of these files in the process shares (the connection counts
  and the request counts write the same counter file, from each thread of a
  `threads: N` worker).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

from upgraderd.contract import metricformat as layout

HEADER = layout.HEADER_SIZE
WRITE_LOCK = threading.Lock()
_VALUE = layout.VALUE


def key(metric: str, sample: str, labels: dict[str, str], help_text: str) -> str:
    """Return a series' key (contract/metricformat.py)."""
    return layout.key(metric, sample, labels, help_text)


def entry(series: str, value: float = 0.0) -> bytes:
    """Return the bytes of one entry (contract/metricformat.py)."""
    return layout.entry(series, value)


class MetricFile:
    """One mmap'ed metric file of this process."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER:   # made, but its space never reserved (a full tmpfs): an OSError, as ENOSPC
                raise OSError(errno.ENOSPC, f"metric file has {size} bytes, not allocated", path)
            self.fd = os.dup(fd)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.positions: dict[str, int] = {}
        self.values: dict[str, float] = {}
        # Start empty: anything there was left by an earlier process with our pid.
        self.used = HEADER
        self.map[:HEADER] = layout.header(self.used)

    def add(self, series: str, delta: float) -> None:
        """Add `delta` to `series` (0 creates it), adding the series to the file first if it is new."""
        value = self.values[series] = self.values.get(series, 0.0) + delta
        pos = self.positions.get(series)
        if pos is None:
            raw = entry(series, value)
            if self.used + len(raw) > len(self.map):
                self._grow(self.used + len(raw))
            self.map[self.used:self.used + len(raw)] = raw
            self.used += len(raw)
            layout.USED.pack_into(self.map, layout.USED_AT, self.used)
            self.positions[series] = self.used - _VALUE.size
            return
        _VALUE.pack_into(self.map, pos, value)

    def _grow(self, need: int) -> None:
        size = len(self.map)
        while size < need:
            size *= 2
        os.posix_fallocate(self.fd, 0, size)
        self.map.close()
        self.map = mmap.mmap(self.fd, size)


_OPEN: dict[str, MetricFile] = {}
_OPEN_BY = [0]   # the pid that opened _OPEN's files


def shared(path: str) -> MetricFile:
    """Return this process's `MetricFile` for `path`, opening it on first use."""
    if _OPEN_BY[0] != os.getpid():
        _OPEN.clear()   # a parent's maps: its file, not ours
        _OPEN_BY[0] = os.getpid()
    f = _OPEN.get(path)
    if f is None:
        f = _OPEN[path] = MetricFile(path)
    return f
