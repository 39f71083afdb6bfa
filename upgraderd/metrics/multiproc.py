"""The workers' multiprocess metric files: their directory, folding and collection.

The built-in workers count connections and bytes with prometheus-client's
multiprocess mode: each worker writes its values into mmap'ed files named
after its pid in one directory (`PROMETHEUS_MULTIPROC_DIR`, set only in the
workers' environment), and the master sums the files at scrape time.

Left alone, that directory grows by one file per worker per metric type for
as long as the master lives: a counter file must outlive its worker, or the
counter would go down, which Prometheus reads as a reset. Other tools end up
with thousands of stale files and scrapes that take tens of seconds. Here,
when the master reaps a worker, `fold()` adds that worker's additive values
(counters, histograms, summaries, `sum` gauges) into one archive file per
type, key by key, and deletes the worker's file; `mark_process_dead` drops
its `live*` gauges. The directory thus holds one file per live worker and
type plus one archive per type, however many workers have come and gone.

Invariants:
- A fold and a collection never interleave (one lock): a scrape sees a dead
  worker's counts either in its own file or in the archive, never in both
  and never in neither, so every sum is monotonic across worker exits.
- Only the master's loop thread folds; collections run in HTTP threads.
- `wipe()` removes only `*.db` files, so a misconfigured `metrics.dir` cannot
  cost the operator anything else.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterable

from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger("upgraderd")

ENV = "PROMETHEUS_MULTIPROC_DIR"
ARCHIVE = "archive"
# File-name prefixes whose values add up across processes (prometheus-client's
# naming: `<type>_<pid>.db`, `gauge_<mode>_<pid>.db`).
ADDITIVE = ("counter", "histogram", "summary", "gauge_sum")


class WorkerFiles:
    """One multiprocess directory, owned by one master."""

    def __init__(self, path: str | None = None, adopt: bool = False, private: bool | None = None) -> None:
        """Use `path` (created if missing, wiped), or a fresh private directory.

        With `adopt`, take over the directory of the master this process was
        exec'd from (SIGUSR2): its live workers and archive carry on, nothing is wiped.
        """
        self.private = path is None if private is None else private
        self.path = tempfile.mkdtemp(prefix="upgraderd-metrics-") if path is None else path
        if not adopt and path is not None:
            os.makedirs(self.path, mode=0o755, exist_ok=True)
            self.wipe()
        self._lock = threading.Lock()
        self._archives: dict[str, MmapedDict] = {}
        self.folded = 0

    def export(self) -> dict[str, object]:
        """Return what a re-exec'd master needs to adopt this directory."""
        return {"path": self.path, "private": self.private}

    @classmethod
    def adopt(cls, data: dict[str, object]) -> WorkerFiles:
        """Take over a directory described by `export()`."""
        return cls(str(data["path"]), adopt=True, private=bool(data["private"]))

    def wipe(self) -> int:
        """Delete every metric file left by an earlier master; return how many."""
        gone = 0
        for f in glob.glob(os.path.join(self.path, "*.db")):
            os.remove(f)
            gone += 1
        if gone:
            log.info("removed %d stale metric file(s) from %s", gone, self.path)
        return gone

    def files(self) -> list[str]:
        """Return the metric files in the directory."""
        return glob.glob(os.path.join(self.path, "*.db"))

    def fold(self, pid: int) -> None:
        """Account for the exit of worker `pid`: archive its counts, drop its files."""
        with self._lock:
            mark_process_dead(pid, self.path)
            for prefix in ADDITIVE:
                f = os.path.join(self.path, f"{prefix}_{pid}.db")
                if os.path.exists(f):
                    self._fold_file(prefix, f)
                    self.folded += 1

    def _fold_file(self, prefix: str, path: str) -> None:
        archive = self._archives.get(prefix)
        if archive is None:
            archive = MmapedDict(os.path.join(self.path, f"{prefix}_{ARCHIVE}.db"))
            self._archives[prefix] = archive
        try:
            # A worker killed while it created its file leaves it empty: nothing to add.
            values = list(MmapedDict.read_all_values_from_file(path)) if os.path.getsize(path) else []
        except (OSError, RuntimeError, struct.error) as e:
            # A torn file cannot be summed; dropping it costs a visible counter
            # reset, keeping it would keep the directory growing.
            log.warning("metric file %s is unreadable (%s); dropping it", path, e)
            values = []
        for key, value, _ts, _pos in values:
            old, _ = archive.read_value(key)
            archive.write_value(key, old + value, 0.0)
        os.remove(path)

    def collect(self) -> Iterable[Metric]:
        """Return the workers' metrics summed over live files and archives."""
        with self._lock:
            return list(MultiProcessCollector.merge(self._readable(), accumulate=True))

    def _readable(self) -> list[str]:
        # A starting worker creates its file empty and only then sizes it; a
        # scrape in between would fail to read the header. Such a file holds
        # no value yet, so it is skipped. (A file cannot shrink back to empty.)
        out = []
        for f in self.files():
            try:
                if os.path.getsize(f) > 0:
                    out.append(f)
            except FileNotFoundError:
                continue
        return out

    def close(self) -> None:
        """Close the archives; remove the directory if it was private."""
        with self._lock:
            for a in self._archives.values():
                a.close()
            self._archives.clear()
            if self.private:
                shutil.rmtree(self.path, ignore_errors=True)
