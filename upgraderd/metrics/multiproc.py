"""The workers' metric files: their directory, folding and collection.

The built-in workers count connections and bytes in upgraderd's own metric
files (contract/metricformat.py): each worker writes its values into mmap'ed
files named after its pid in one directory (`UPGRADERD_METRICS_DIR`, set only
in the built-in workers' environment), and the master sums the files at
scrape time (families.py).

Left alone, that directory grows by one file per worker per metric type for
as long as the master lives: a counter file must outlive its worker, or the
counter would go down, which Prometheus reads as a reset. Here, when the
master reaps a worker, `fold()` adds that worker's additive values (counters,
histograms, summaries, `sum` gauges) into an archive, key by key, deletes the
worker's file and its `live*` gauge files. The directory thus holds one file
per live worker and type, however many workers have come and gone.

Design note: workers run application code and can write anything into that
directory, so every file in it is untrusted input (see dbfile.py for the
reader). The archive therefore lives in the master's memory only, never in
a file a worker could truncate under an mmap (SIGBUS) or rewrite; a SIGUSR2
re-exec carries it over in `export()`. A file that fails validation is set
aside (renamed to `NAME.rejected`, out of the scrape set; at most
`KEEP_REJECTED` are kept for inspection) and counted by reason.

Invariants:
- A scrape sees a dead worker's counts either in its file or in the archive,
  never in both and never in neither. A fold changes the archive and removes
  the file under one lock and bumps a version; a collection reads the files
  outside the lock and retries if the version moved, so neither side holds the
  lock while reading files and a fold never waits for a scrape.
- Only the master's loop thread folds; collections run in HTTP threads.
- `wipe()` removes only names this module's workers produce
  (`counter_123.db`, `gauge_livesum_123.db`, ... and their `.rejected`), never
  other files, `.db` or not.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from prometheus_client.metrics_core import Metric

from upgraderd.contract import metricformat as layout
from upgraderd.contract.env import METRICS_DIR
from upgraderd.metrics import dbfile, tmpdirs
from upgraderd.metrics.dbfile import BadFile, FileName, Key
from upgraderd.metrics.families import Reading, merge

log = logging.getLogger("upgraderd")

ENV = METRICS_DIR
REJECTED = ".rejected"
# File-name prefixes whose values add up across processes.
ADDITIVE = ("counter", "histogram", "summary", "gauge_sum")
REASONS = ("unreadable", "format", "size", "entry", "key", "value", "slow")
KEEP_REJECTED = 32
MAX_ARCHIVE_KEYS = 20000
MAX_FILES = 4096
# What one reaped worker's files may cost the master's loop, all files together.
FOLD_BUDGET = 0.05


class WorkerFiles:
    """One multiprocess directory, owned by one master."""

    def __init__(self, path: str | None = None, adopt: bool = False, private: bool | None = None) -> None:
        """Use `path` (created if missing, wiped), or a fresh private directory.

        With `adopt`, take over the directory of the master this process was
        exec'd from (SIGUSR2): its live workers' files carry on, nothing is wiped.
        A directory that cannot be created or written disables the workers'
        metrics, with a warning, instead of stopping the master.
        """
        self.private = path is None if private is None else private
        self._lock = threading.Lock()
        self._archive: dict[str, dict[Key, float]] = {p: {} for p in ADDITIVE}
        self._version = 0
        self._cache: dict[bytes, Key] = {}
        self._ignored: set[str] = set()
        self._set_aside: deque[str] = deque()
        self.rejected = dict.fromkeys(REASONS, 0)
        self.dropped_keys = 0
        self.folded = 0
        self.enabled = True
        self.path = ""
        try:
            self.path = self._open(path, adopt)
        except OSError as e:
            self.enabled = False
            log.warning("workers' metrics disabled: metrics directory %s is not writable (%s)",
                        path or self.path or "(private)", e.strerror or e)

    def _open(self, path: str | None, adopt: bool) -> str:
        if path is None:
            tmpdirs.clean_stale()
            self.path = tmpdirs.make_private()
            return self.path
        self.path = path
        if not adopt:
            os.makedirs(path, mode=0o755, exist_ok=True)
            self.wipe()
            tmpdirs.probe_writable(path)
        return path

    @property
    def cache(self) -> dict[bytes, Key]:
        """Return the parsed keys shared by every reader of this directory's files."""
        return self._cache

    def export(self) -> dict[str, object]:
        """Return what a re-exec'd master needs to adopt this directory and archive."""
        with self._lock:
            archive = {p: [[list(k[:2]) + [list(map(list, k[2])), k[3]], v] for k, v in vals.items()]
                       for p, vals in self._archive.items()}
            return {"path": self.path, "private": self.private, "enabled": self.enabled,
                    "archive": archive, "rejected": dict(self.rejected), "folded": self.folded}

    @classmethod
    def adopt(cls, data: dict[str, Any]) -> WorkerFiles:
        """Take over a directory described by `export()`."""
        files = cls(str(data["path"]), adopt=True, private=bool(data["private"]))
        files.enabled = files.enabled and bool(data.get("enabled", True))
        for prefix, entries in dict(data.get("archive") or {}).items():
            if prefix in files._archive:
                for (metric, sample, labels, help_text), value in entries:
                    key = (str(metric), str(sample), tuple((str(a), str(b)) for a, b in labels), str(help_text))
                    files._archive[prefix][key] = float(value)
        for reason, n in dict(data.get("rejected") or {}).items():
            if reason in files.rejected:
                files.rejected[reason] = int(n)
        files.folded = int(data.get("folded", 0))
        if "archive" not in data and files.enabled:
            files._adopt_archive_files()
        return files

    def _adopt_archive_files(self) -> None:
        """Read the archive files an older master kept in the directory, then remove them."""
        for prefix in ADDITIVE:
            path = os.path.join(self.path, f"{prefix}_archive.db")
            kind = prefix.partition("_")[0]
            try:
                entries = dbfile.read_file(path, kind, self._cache)
            except FileNotFoundError:
                continue
            except BadFile as e:
                log.warning("archive %s of the previous master is unusable (%s); its counts are lost", path, e)
                entries = []
            self._add(prefix, entries)
            _remove(path)

    def wipe(self) -> int:
        """Delete the metric files an earlier master's workers left; return how many."""
        gone = 0
        for name in os.listdir(self.path):
            base = name[:-len(REJECTED)] if name.endswith(REJECTED) else name
            if dbfile.parse_name(base) is None and not _is_old_archive(base):
                continue
            if _remove(os.path.join(self.path, name)):
                gone += 1
        if gone:
            log.info("removed %d stale metric file(s) from %s", gone, self.path)
        return gone

    def files(self) -> list[str]:
        """Return the worker metric files in the directory (paths), at most MAX_FILES."""
        return [os.path.join(self.path, n) for n, _ in self._names()]

    def _names(self) -> list[tuple[str, FileName]]:
        out: list[tuple[str, FileName]] = []
        if not self.enabled:
            return out
        try:
            with os.scandir(self.path) as it:
                for entry in it:
                    parsed = dbfile.parse_name(entry.name)
                    if parsed is not None and entry.name not in self._ignored:
                        out.append((entry.name, parsed))
                        if len(out) >= MAX_FILES:
                            break
        except OSError as e:
            log.warning("cannot list metric directory %s: %s", self.path, e.strerror or e)
        # By name: every counter file is read before any histogram file. A worker writes a
        # request's duration before its count (apps/asgi/reqmetrics.py), so a scrape never
        # shows more requests counted than observed in the duration histogram.
        out.sort()
        return out

    def fold(self, pid: int) -> None:
        """Account for the exit of worker `pid`: archive its counts, drop its files."""
        if not self.enabled:
            return
        with self._lock:
            for mode in layout.GAUGE_MODES:
                if mode.startswith("live"):
                    self._drop(layout.file_name(f"gauge_{mode}", pid))
        deadline = time.thread_time() + FOLD_BUDGET   # CPU, as dbfile's budget
        for prefix in ADDITIVE:
            name = layout.file_name(prefix, pid)
            budget = max(0.005, deadline - time.thread_time())
            try:
                entries = dbfile.read_file(os.path.join(self.path, name), prefix.partition("_")[0], self._cache,
                                           budget)
            except FileNotFoundError:
                continue
            except BadFile as e:
                self._reject(name, e)
                continue
            with self._lock:
                self._add(prefix, entries)
                self._drop(name)
                self.folded += 1

    def _add(self, prefix: str, entries: list[tuple[Key, float]]) -> None:
        """Add `entries` into the archive of `prefix` (lock held)."""
        archive = self._archive[prefix]
        for key, value in entries:
            total = archive.get(key, 0.0) + value
            if key not in archive and sum(map(len, self._archive.values())) >= MAX_ARCHIVE_KEYS:
                self.dropped_keys += 1
                if self.dropped_keys == 1:
                    log.warning("metric archive full (%d series); counts of new series from dead "
                                "workers are dropped", MAX_ARCHIVE_KEYS)
                continue
            if math.isfinite(total):
                archive[key] = total
        self._version += 1

    def _drop(self, name: str) -> None:
        """Remove a folded file; if that fails, never read it again (it is in the archive now)."""
        self._version += 1
        if not _remove(os.path.join(self.path, name), quiet=False) and os.path.lexists(
                os.path.join(self.path, name)):
            self._ignore(name)

    def _ignore(self, name: str) -> None:
        if len(self._ignored) < 4 * MAX_FILES:
            self._ignored.add(name)

    def _reject(self, name: str, e: BadFile) -> None:
        """Count a bad file and move it out of the scrape set."""
        src = os.path.join(self.path, name)
        with self._lock:
            if name in self._ignored:
                return
            try:
                os.rename(src, src + REJECTED)
                self._set_aside.append(name + REJECTED)
            except FileNotFoundError:
                return  # a concurrent scrape set it aside first, or it was folded: counted there
            except OSError:
                self._ignore(name)  # a read-only directory: at least never read it again
            self.rejected[e.reason] += 1
            while len(self._set_aside) > KEEP_REJECTED:
                _remove(os.path.join(self.path, self._set_aside.popleft()))
        log.warning("metric file %s rejected (%s); set aside as %s%s", name, e, name, REJECTED)

    def collect(self) -> Iterable[Metric]:
        """Return the workers' metrics summed over live files and the archive."""
        for attempt in range(3):
            with self._lock:
                version = self._version
                archive = {p: dict(v) for p, v in self._archive.items()}
            reading = self._read_all()
            with self._lock:
                if version == self._version:
                    break
        else:
            with self._lock:  # three folds raced us: read once more, holding them off
                archive = {p: dict(v) for p, v in self._archive.items()}
                reading = self._read_all()
        return merge(reading, archive)

    def _read_all(self) -> Reading:
        out: Reading = []
        for name, parsed in self._names():
            try:
                out.append((parsed, dbfile.read_file(os.path.join(self.path, name), parsed.kind, self._cache)))
            except FileNotFoundError:
                continue  # folded or removed since the listing
            except BadFile as e:
                self._reject(name, e)
        return out

    def close(self) -> None:
        """Drop the archive; remove the directory if it was private."""
        with self._lock:
            if self.private and self.path:
                tmpdirs.remove_private(self.path)


def _is_old_archive(name: str) -> bool:
    return any(name == f"{p}_archive.db" for p in ADDITIVE)


def _remove(path: str, quiet: bool = True) -> bool:
    """Remove `path` (a symlink itself, never its target); return True if it was removed."""
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as e:
        if not quiet:
            log.warning("cannot remove metric file %s: %s", path, e.strerror or e)
        return False
