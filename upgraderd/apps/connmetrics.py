"""Connection metrics of a built-in worker, in the workers' metric files.

The master sets `UPGRADERD_METRICS_DIR` in a built-in worker's environment
(and nowhere else); the worker then writes its counts into mmap'ed files in
that directory (contract/metricformat.py), which the master sums at scrape
time and folds into an archive when the worker exits (see
metrics/multiproc.py). Without the variable (a worker run by hand, or under
systemd) nothing is recorded.

Design note: the event loop only bumps plain integers (accepted, closed and
byte counts straight in the list `tally()` returns); `flush()` writes the
changes to the metric files, at most every `server.HOUSEKEEPING` seconds
(20 ms) while busy and at once when idle. That keeps the per-connection cost
at list updates instead of a flush per loop pass (about 4 us each, which was
a tenth of an echo worker's CPU with a new connection per round trip), at the
price, if the worker is SIGKILLed, of losing at most 20 ms of its counts.

`upgraderd_connections_active` is labelled by the state of the generation as
this worker sees it: `active` until it is asked to drain, `draining` after.
It is a `livesum` gauge: a worker's share disappears when it is reaped.

The files are made at the first flush, which the loop runs after READY=1:
made before, they were about 2 ms of CPU per worker (two files created,
allocated and mapped, two dozen series written at 0, each page a first
touch) on the path to READY, which a generation of N workers pays N times
before it is ACTIVE. The counts are kept in memory until then, as between
any two flushes.

A worker that cannot write its metrics keeps serving without them and says
so once on stderr. A file sized with `truncate` on a full tmpfs has pages that
raise SIGBUS when first written; so before the files are mapped, `_reserve`
allocates each whole with `posix_fallocate`, large enough for every series
this worker writes (twice over). A full or read-only directory then fails
that call, not a later write.

The files are written by apps/metricfile.py, without prometheus-client:
importing it cost a prefork template about 40 ms of CPU before it could fork
a worker.

A worker with `threads: N` runs N `Server`s, each with its own
`ConnectionMetrics`. They share one sink per process (`_shared_sink`), and
every `ConnectionMetrics` reports changes, never absolute values, also for
the gauge, so that their counts add up.
"""

from __future__ import annotations

import os
import threading

from upgraderd.apps import httpcounts, logline, metricfile
from upgraderd.contract import metricformat as layout
from upgraderd.contract.env import METRICS_DIR
from upgraderd.worker.taker import MAX_HELD_BYTES

ENV = METRICS_DIR
# Every reason a hand-off can fail for (docs/metrics.md); each series starts at 0.
ACCEPTED, CLOSED, RX, TX = 0, 1, 2, 3  # indexes in a listener's tally (the loop adds to them directly)
HANDOFF_FAILURES = ("refused", "timeout", "taker_gone", "untrusted_taker", "malformed_reply", "too_large",
                    "untrusted_giver", "malformed", "abandoned", "stalled_giver", "busy", "channel_in_use",
                    "idle_giver", "over_capacity")


class ConnectionMetrics:
    """Per-listener connection and byte counts of this worker."""

    def __init__(self, listeners: list[str], enabled: bool | None = None, udp: bool = False) -> None:
        self.listeners = list(listeners)
        # The files are made at the first flush, after READY=1, not here (see the docstring).
        self._wanted = bool(os.environ.get(ENV)) if enabled is None else enabled
        self._udp = udp
        self._sink: _Sink | None = None
        self.is_draining = False
        # accepted, closed, rx, tx, handed off, taken over, datagrams in, out, replies unsent
        self._counts = {name: [0] * 9 for name in self.listeners}
        self._flushed = {name: [0] * 9 for name in self.listeners}
        self._failures: dict[str, int] = {}
        # (listener, socket inode) -> the kernel's drop counter as last read (SO_RXQ_OVFL)
        self._drops: dict[tuple[str, str], int] = {}
        self._dirty = True
        self._reported = {name: {"active": 0, "draining": 0} for name in self.listeners}

    def tally(self, listener: str) -> list[int]:
        """Return the live counts of `listener`; a loop may add to [ACCEPTED], [CLOSED], [RX] and [TX] directly.

        What is added there reaches the files at the next `flush()`, like every other count.
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

    def datagram_in(self, listener: str, n: int) -> None:
        """Count one datagram of `n` bytes read from UDP `listener`."""
        c = self._counts[listener]
        c[6] += 1
        c[2] += n
        self._dirty = True

    def datagram_out(self, listener: str, n: int) -> None:
        """Count one reply of `n` bytes sent on UDP `listener`."""
        c = self._counts[listener]
        c[7] += 1
        c[3] += n
        self._dirty = True

    def datagram_unsent(self, listener: str) -> None:
        """Count a reply the kernel would not take (send buffer full, unreachable)."""
        self._counts[listener][8] += 1
        self._dirty = True

    def udp_drops(self, listener: str, socket_id: str, total: int) -> None:
        """Record the kernel's cumulative receive-buffer drop count of one UDP socket."""
        key = (listener, socket_id)
        if self._drops.get(key) != total:
            self._drops[key] = total
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
        if n and reason == "over_capacity":  # the one refusal that says the worker is full, not the giver wrong
            logline.log(f"refused {n} hand-off offer(s) over capacity: with them this worker would hold more "
                        f"than {MAX_HELD_BYTES >> 20} MiB offered by its givers and not committed; the givers "
                        f"keep those connections and serve them on", "WARNING")

    def draining(self) -> None:
        """This worker was asked to drain: its open connections now count as draining."""
        self.is_draining = True
        self._dirty = True

    @property
    def enabled(self) -> bool:
        """Return True if this worker reports (its files are made now if they were not yet)."""
        return self._open() is not None

    def _open(self) -> _Sink | None:
        if self._wanted:
            self._wanted = False
            self._sink = _shared_sink(tuple(self.listeners), self._udp)
        return self._sink

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
        sink = self._open()
        if sink is None:
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
            sink.write(name, deltas, gauge)
        for reason, n in self._failures.items():
            sink.failed(reason, n)
        self._failures.clear()
        for (name, socket_id), total in self._drops.items():
            sink.drops_seen(name, socket_id, total)
        httpcounts.flush_thread(self.is_draining)   # the http app's, this thread's: same tick


_SINKS: dict[tuple[int, tuple[str, ...]], _Sink | None] = {}   # by (pid, listeners): a fork reports apart
_SINKS_LOCK = threading.Lock()
_FILE_SIZE = 1 << 16  # a file's initial size; it doubles from there


def _shared_sink(listeners: tuple[str, ...], udp: bool = False) -> _Sink | None:
    """Return this process's metric objects (one set per process), or None if it cannot report."""
    key = (os.getpid(), listeners)
    with _SINKS_LOCK:
        if key not in _SINKS:
            try:
                _reserve(listeners, udp)
                _SINKS[key] = _Sink(list(listeners))
            except OSError as e:
                _SINKS[key] = None
                logline.log(f"upgraderd worker {os.getpid()}: connection metrics disabled, cannot write "
                            f"{os.environ.get(ENV)}: {e.strerror or e}; serving without them", "WARNING")
        return _SINKS[key]


def _reserve(listeners: tuple[str, ...], udp: bool = False) -> None:
    """Allocate this process's metric files whole, so that no later write can fault."""
    directory = os.environ.get(ENV, "")
    # Eleven series per listener (nine counters, two gauge states), one UDP socket's drops
    # per listener, and the failure counters, each bounded from above.
    need = 8 + 12 * sum(_entry_size(name) for name in listeners) + len(HANDOFF_FAILURES) * _entry_size("")
    size = _FILE_SIZE
    while size < 2 * need:
        size *= 2
    # The drop gauge (livemax) has its own file, written only by a worker with a UDP listener.
    for prefix in ("counter", "gauge_livesum", *(("gauge_livemax",) if udp else ())):
        path = os.path.join(directory, layout.file_name(prefix, os.getpid()))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            if os.fstat(fd).st_size < size:
                os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)


def _entry_size(listener: str) -> int:
    """Return an upper bound of the bytes one series of `listener` takes in a file."""
    metric, help_text = "upgraderd_connections_accepted_draining", "h" * 200
    key = layout.key(metric, metric + "_total", {"listener": listener, "state": "draining"}, help_text)
    return len(layout.entry(key))


COUNTERS = (
    ("upgraderd_connections_accepted", "Connections accepted by the built-in workers."),
    ("upgraderd_connections_closed", "Connections of the built-in workers that ended."),
    ("upgraderd_bytes_received", "Bytes the built-in workers read from clients."),
    ("upgraderd_bytes_sent", "Bytes the built-in workers wrote to clients."),
    ("upgraderd_connections_handed_off", "Connections a draining built-in worker handed to another worker."),
    ("upgraderd_connections_taken_over", "Connections a built-in worker took over from another worker."),
    ("upgraderd_datagrams_received", "UDP datagrams the built-in workers read."),
    ("upgraderd_datagrams_sent", "UDP datagrams the built-in workers sent (replies)."),
    ("upgraderd_datagrams_unsent", "UDP replies the kernel did not take (send buffer full for 1 s, or "
     "the destination unreachable)."),
)
FAILURES = ("upgraderd_handoff_failures", "Connection hand-offs that did not happen, by reason; the "
            "connection stayed where it was.")
DROPS = ("upgraderd_udp_receive_drops", "Datagrams the kernel dropped on a UDP socket because its receive "
         "buffer was full, since the socket was bound (SO_RXQ_OVFL, as last read by a live worker).")
ACTIVE = ("upgraderd_connections_active", "Open connections of the built-in workers, by the state of "
          "their generation (active or draining).")


def _counter(metric: tuple[str, str], **labels: str) -> str:
    return metricfile.key(metric[0], metric[0] + "_total", labels, metric[1])


class _Sink:
    """This worker's metric files (apps/metricfile.py), created only in a worker that reports."""

    def __init__(self, listeners: list[str]) -> None:
        directory = os.environ.get(ENV, "")
        self.counters = metricfile.shared(os.path.join(directory, layout.file_name("counter", os.getpid())))
        self.gauges = metricfile.shared(os.path.join(directory, layout.file_name("gauge_livesum", os.getpid())))
        # The drop gauge's file is opened on the first reading: only a UDP worker has one.
        self.drops_path = os.path.join(directory, layout.file_name("gauge_livemax", os.getpid()))
        self._drops_max: dict[tuple[str, str], int] = {}
        self.keys = {name: [_counter(c, listener=name) for c in COUNTERS] for name in listeners}
        self.states = {name: {state: metricfile.key(ACTIVE[0], ACTIVE[0], {"listener": name, "state": state},
                                                    ACTIVE[1]) for state in ("active", "draining")}
                       for name in listeners}
        self.failure_keys = {reason: _counter(FAILURES, reason=reason) for reason in HANDOFF_FAILURES}
        self.lock = metricfile.WRITE_LOCK   # the request counts write the counter file too
        with self.lock:
            # Create every series at 0 so that rate() and increase() see its start.
            for name in listeners:
                for series in self.keys[name]:
                    self.counters.add(series, 0)
                for series in self.states[name].values():
                    self.gauges.add(series, 0)
            for series in self.failure_keys.values():
                self.counters.add(series, 0)

    def drops_seen(self, listener: str, socket_id: str, total: int) -> None:
        # Threads of one worker share this gauge: keep the largest (the newest) reading.
        # The file only adds, so it is given the step from the last reading.
        with self.lock:
            key = (listener, socket_id)
            before = self._drops_max.get(key)
            if before is None or total > before:
                self._drops_max[key] = total
                metricfile.shared(self.drops_path).add(
                    metricfile.key(DROPS[0], DROPS[0], {"listener": listener, "socket": socket_id}, DROPS[1]),
                    total - (before or 0))

    def write(self, listener: str, deltas: list[int], gauge: dict[str, int]) -> None:
        with self.lock:
            for series, delta in zip(self.keys[listener], deltas):
                if delta:
                    self.counters.add(series, delta)
            for state, delta in gauge.items():
                if delta:
                    self.gauges.add(self.states[listener][state], delta)

    def failed(self, reason: str, n: int) -> None:
        series = self.failure_keys.get(reason) or _counter(FAILURES, reason=reason)
        with self.lock:
            self.counters.add(series, n)
