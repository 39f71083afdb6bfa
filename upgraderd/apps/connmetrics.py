"""Connection metrics of a built-in worker, in prometheus-client's multiprocess mode.

The master sets `PROMETHEUS_MULTIPROC_DIR` in a built-in worker's environment
(and nowhere else); the worker then writes its counts into mmap'ed files in
that directory, which the master sums at scrape time and folds into an
archive when the worker exits (see upgraderd/multiproc.py). Without the
variable (a worker run by hand, or under systemd) nothing is recorded.

Design note: the event loop only bumps plain integers (the byte counts straight
in the list `tally()` returns); `flush()` writes the changes to the metric
files. The loop flushes after every pass in which a connection count changed
(`dirty`), and otherwise, when only bytes moved, at most every
`server.HOUSEKEEPING` seconds (20 ms) while busy and at once when idle. That
keeps the per-read cost at a list update instead of a lock and an mmap write,
at the price, if the worker is SIGKILLed, of losing at most the loop pass it
was in of the connection counts, and at most 20 ms of the byte counts.

`upgraderd_connections_active` is labelled by the state of the generation as
this worker sees it: `active` until it is asked to drain, `draining` after.
It is a `livesum` gauge: a worker's share disappears when it is reaped.

A worker that cannot write its metrics keeps serving without them and says
so once on stderr. prometheus-client sizes its files with `truncate`, which
on a full tmpfs leaves pages that raise SIGBUS when first written; so before
the library opens them, `_reserve` allocates each file whole with
`posix_fallocate`, large enough for every series this worker writes (twice
over). A full or read-only directory then fails that call, not a later write.

A worker with `threads: N` runs N `Server`s, each with its own
`ConnectionMetrics`. They share one set of prometheus-client metric objects
(`_shared_sink`): each metric object caches its value and writes it whole to
the process's file, so two objects for the same series would overwrite each
other. For the same reason every `ConnectionMetrics` reports changes
(`inc`), never absolute values (`set`), also for the gauge.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"
# Every reason a hand-off can fail for (docs/metrics.md); each series starts at 0.
RX, TX = 2, 3  # indexes of the byte counts in a listener's tally
HANDOFF_FAILURES = ("refused", "timeout", "taker_gone", "untrusted_taker", "malformed_reply", "too_large",
                    "untrusted_giver", "malformed", "abandoned", "stalled_giver", "busy", "channel_in_use")


class ConnectionMetrics:
    """Per-listener connection and byte counts of this worker."""

    def __init__(self, listeners: list[str], enabled: bool | None = None) -> None:
        self.listeners = list(listeners)
        enabled = bool(os.environ.get(ENV)) if enabled is None else enabled
        self._sink: _Sink | None = _shared_sink(tuple(self.listeners)) if enabled else None
        self.enabled = self._sink is not None
        self.is_draining = False
        # accepted, closed, rx, tx, handed off, taken over
        self._counts = {name: [0] * 6 for name in self.listeners}
        self._flushed = {name: [0] * 6 for name in self.listeners}
        self._failures: dict[str, int] = {}
        self._dirty = True
        self._reported = {name: {"active": 0, "draining": 0} for name in self.listeners}

    def tally(self, listener: str) -> list[int]:
        """Return the live counts of `listener`; a loop may add bytes at [RX] and [TX] directly.

        Bytes added there reach the files at the next `flush()`, like every other count.
        """
        return self._counts[listener]

    def accepted(self, listener: str) -> None:
        """Count a new connection on `listener`."""
        self._counts[listener][0] += 1
        self._dirty = True

    def closed(self, listener: str) -> None:
        """Count a connection of `listener` that this worker closed."""
        self._counts[listener][1] += 1
        self._dirty = True

    def received(self, listener: str, n: int) -> None:
        """Count `n` bytes read from a connection of `listener`."""
        self._counts[listener][2] += n
        self._dirty = True

    def sent(self, listener: str, n: int) -> None:
        """Count `n` bytes written to a connection of `listener`."""
        self._counts[listener][3] += n
        self._dirty = True

    def handed_off(self, listener: str) -> None:
        """Count a connection of `listener` that another worker serves from now on."""
        self._counts[listener][4] += 1
        self._dirty = True

    def taken_over(self, listener: str) -> None:
        """Count a connection of `listener` that another worker handed to this one."""
        self._counts[listener][5] += 1
        self._dirty = True

    def handoff_failed(self, reason: str, n: int = 1) -> None:
        """Count `n` hand-off failures of one kind (see docs/metrics.md for the reasons)."""
        if n:
            self._failures[reason] = self._failures.get(reason, 0) + n
            self._dirty = True

    def draining(self) -> None:
        """This worker was asked to drain: its open connections now count as draining."""
        self.is_draining = True
        self._dirty = True

    @property
    def dirty(self) -> bool:
        """Return True if a count other than bytes changed since the last flush."""
        return self._dirty

    def active(self, listener: str) -> int:
        """Return the connections of `listener` open right now."""
        c = self._counts[listener]
        return c[0] + c[5] - c[1] - c[4]

    def flush(self) -> None:
        """Write what changed since the last flush to the metric files."""
        if self._sink is None:
            return
        dirty, self._dirty = self._dirty, False
        for name in self.listeners:
            now, before = self._counts[name], self._flushed[name]
            if not dirty and now == before:
                continue  # the byte counts are added to without setting _dirty
            deltas = [a - b for a, b in zip(now, before)]
            self._flushed[name] = list(now)
            open_now = self.active(name)
            want = {"active": 0 if self.is_draining else open_now, "draining": open_now if self.is_draining else 0}
            gauge = {state: want[state] - self._reported[name][state] for state in want}
            self._reported[name] = want
            self._sink.write(name, deltas, gauge)
        for reason, n in self._failures.items():
            self._sink.failures.labels(reason).inc(n)
        self._failures.clear()


_SINKS: dict[tuple[str, ...], _Sink | None] = {}
_SINKS_LOCK = threading.Lock()
_FILE_SIZE = 1 << 16  # prometheus-client's initial size; it doubles from there


def _shared_sink(listeners: tuple[str, ...]) -> _Sink | None:
    """Return this process's metric objects (one set per process), or None if it cannot report."""
    with _SINKS_LOCK:
        if listeners not in _SINKS:
            try:
                _reserve(listeners)
                _SINKS[listeners] = _Sink(list(listeners))
            except OSError as e:
                _SINKS[listeners] = None
                print(f"upgraderd worker {os.getpid()}: connection metrics disabled, cannot write "
                      f"{os.environ.get(ENV)}: {e.strerror or e}; serving without them",
                      file=sys.stderr, flush=True)
        return _SINKS[listeners]


def _reserve(listeners: tuple[str, ...]) -> None:
    """Allocate this process's metric files whole, so that no later write can fault."""
    directory = os.environ.get(ENV, "")
    # Six series per listener (four counters, two gauge states), each bounded from above.
    need = 8 + 6 * sum(_entry_size(name) for name in listeners)
    size = _FILE_SIZE
    while size < 2 * need:
        size *= 2
    for prefix in ("counter", "gauge_livesum"):
        path = os.path.join(directory, f"{prefix}_{os.getpid()}.db")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            if os.fstat(fd).st_size < size:
                os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)


def _entry_size(listener: str) -> int:
    """Return an upper bound of the bytes one series of `listener` takes in a file."""
    metric, help_text = "upgraderd_connections_accepted_draining", "h" * 200
    key = json.dumps([metric, metric + "_total", {"listener": listener, "state": "draining"}, help_text])
    return 4 + len(key.encode()) + 8 + 16


class _Sink:
    """The prometheus-client metrics, created only in a worker that reports."""

    def __init__(self, listeners: list[str]) -> None:
        # Imported here: prometheus-client chooses multiprocess mode at import
        # time, from the environment, and only a reporting worker has ENV set.
        from prometheus_client import Counter, Gauge
        labels = ["listener"]
        self.counters: list[Any] = [
            Counter("upgraderd_connections_accepted_total", "Connections accepted by the built-in workers.",
                    labels, registry=None),
            Counter("upgraderd_connections_closed_total", "Connections of the built-in workers that ended.",
                    labels, registry=None),
            Counter("upgraderd_bytes_received_total", "Bytes the built-in workers read from clients.",
                    labels, registry=None),
            Counter("upgraderd_bytes_sent_total", "Bytes the built-in workers wrote to clients.",
                    labels, registry=None),
            Counter("upgraderd_connections_handed_off_total", "Connections a draining built-in worker "
                    "handed to another worker.", labels, registry=None),
            Counter("upgraderd_connections_taken_over_total", "Connections a built-in worker took over "
                    "from another worker.", labels, registry=None),
        ]
        self.failures = Counter("upgraderd_handoff_failures_total", "Connection hand-offs that did not "
                                "happen, by reason; the connection stayed where it was.", ["reason"],
                                registry=None)
        self.active = Gauge("upgraderd_connections_active", "Open connections of the built-in workers, by "
                            "the state of their generation (active or draining).", ["listener", "state"],
                            registry=None, multiprocess_mode="livesum")
        # Create every series at 0 so that rate() and increase() see its start.
        self._series = {name: [c.labels(name) for c in self.counters] for name in listeners}
        for name in listeners:
            self.active.labels(name, "active").set(0)
            self.active.labels(name, "draining").set(0)
        for reason in HANDOFF_FAILURES:
            self.failures.labels(reason)

    def write(self, listener: str, deltas: list[int], gauge: dict[str, int]) -> None:
        for counter, delta in zip(self._series[listener], deltas):
            if delta:
                counter.inc(delta)
        for state, delta in gauge.items():
            if delta:
                self.active.labels(listener, state).inc(delta)
