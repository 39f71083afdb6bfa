"""The master's event counts and timings, each declared once with its metric.

Invariant: every count only grows while the master lives, and a USR2 re-exec
hands them to the new master (`Stats.restore(stats.export())`), so the
Prometheus counters built from them never reset.

A counter is one field here, declared with `counter()` (or `labelled()`): its
metric name, help text and label. The metrics collector (metrics/telemetry.py)
walks these declarations. It counts one kind of event (core/events.py): one
line in `Tally.__init__` subscribes it. So a new counter touches this file (its
declaration and its subscription), the owner that emits the event if the event
is new, and docs/metrics.md.

Invariant: `Tally` is the only writer of a `Stats`, and the only part of the
master that keeps the master's one `Stats` object; everyone else reads it
through the tally (`Master.stats`) or a copy (`Snapshot.stats`). A USR2 re-exec
replaces that object in one place (`Tally.restore`), so no part of the master
can go on counting into a stale one.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, TypeVar

from upgraderd.core import events as ev
from upgraderd.core.durations import DRAIN_BUCKETS, RELOAD_BUCKETS, Durations

E = TypeVar("E", bound=ev.Event)


def counter(name: str, doc: str) -> int:
    """Declare a counter field without labels."""
    return field(default=0, metadata={"metric": name, "doc": doc, "label": None})


def labelled(name: str, doc: str, label: str, values: tuple[str, ...]) -> dict[str, int]:
    """Declare a counter field with one label: a dict label value -> int, every value at 0."""
    return field(default_factory=lambda: dict.fromkeys(values, 0),
                 metadata={"metric": name, "doc": doc, "label": label})


@dataclass(frozen=True)
class CounterSpec:
    """One declared counter."""

    attr: str
    metric: str
    doc: str
    label: str | None


@dataclass
class Stats:
    """Event counts and timings; they only ever grow while the master lives."""

    reloads: dict[str, int] = labelled(
        "upgraderd_reloads", "Reloads by result: success, failed (the new generation did not become "
        "ACTIVE) or rejected (invalid config or bind error).", "result", ("success", "failed", "rejected"))
    worker_exits: dict[str, int] = labelled(
        "upgraderd_worker_exits", "Worker processes reaped, by how they ended.", "reason",
        ("clean", "error", "signal"))
    worker_restarts: int = counter(
        "upgraderd_worker_restarts", "Workers respawned into the slot of a dead worker of an ACTIVE generation.")
    templates_started: dict[str, int] = labelled(
        "upgraderd_templates_started", "Prefork templates started for a generation: cold (a fresh exec) or "
        "warm (a standby took the generation).", "kind", ("cold", "warm"))
    notify_rejected: int = counter(
        "upgraderd_notify_rejected", "Notify messages ignored because they came from a process that is not "
        "a worker, or were malformed.")
    drain_timeouts: int = counter(
        "upgraderd_drain_timeouts", "Workers SIGKILLed because they still ran at their drain deadline.")
    slot_retire_risks: int = counter(
        "upgraderd_slot_retire_risks", "reuseport slots retired (TTOU, or a reload to fewer workers) while "
        "tcp_migrate_req was not 1, so connections queued on the closing socket could be reset.")
    steering_refused: int = counter(
        "upgraderd_steering_refused", "Reuseport steering programs the kernel refused; the group then spreads "
        "new connections over every socket, ready or not, as without steering.")
    rescued_connections: int = counter(
        "upgraderd_rescued_connections", "Connections the master took from the queue of a reuseport slot "
        "whose worker was in back-off or given up, to hand them to a READY worker of the same generation.")
    orphans_taken_over: int = counter(
        "upgraderd_orphans_taken_over", "Orphaned workers of a dead master (same pidfile) this master found at "
        "start, took the listening sockets of, and drained once its first generation was ACTIVE.")
    watch_triggers: int = counter(
        "upgraderd_watch_triggers", "Reloads queued because a path in reload.watch really changed (its "
        "fingerprint differs); the outcome is counted in upgraderd_reloads_total like a HUP's.")
    rollouts: dict[str, int] = labelled(
        "upgraderd_rollouts", "Canary rollouts by verdict: promoted, or rolled_back by a failing check "
        "(each also counts as a reload, success or failed).", "result", ("promoted", "rolled_back"))
    rollout_check_failures: dict[str, int] = labelled(
        "upgraderd_rollout_check_failures", "Rollouts rolled back, by the check that failed: crashes, http, "
        "command, error_ratio, latency_p99, or ready (a promoted worker not ready in time).", "check",
        ("crashes", "http", "command", "error_ratio", "latency_p99", "ready"))
    internal_errors: int = counter(
        "upgraderd_internal_errors", "Exceptions inside one pass of the master's loop that the master "
        "logged and survived (a bug: please report it with the log line).")
    last_reload_ok: bool = True
    last_reload_success_at: float = 0.0
    last_reload_error: str = ""
    reload_durations: Durations = field(default_factory=lambda: Durations(RELOAD_BUCKETS))
    drain_durations: Durations = field(default_factory=lambda: Durations(DRAIN_BUCKETS))
    # For `upgraderd reload`: HUPs seen, and how many of them the last settled reload covered.
    hups: int = 0
    last_reload_covers: int = 0
    last_reload_result: str = ""
    last_reload_generation: int = 0

    def copy(self) -> Stats:
        """Return a copy the master will not mutate (for the metrics thread), once per loop pass.

        Each field is immutable, a dict of ints or a Durations, so copying one level
        deep is a deep copy, at a tenth of copy.deepcopy's cost.
        """
        new = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, dict):
                setattr(new, name, dict(value))
            elif isinstance(value, Durations):
                setattr(new, name, value.copy())
        return new

    def export(self) -> dict[str, object]:
        """Return every field as plain data, for a USR2 hand-over."""
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        # `Stats(**stats.export())` passes the histograms as dicts; an older master
        # passed the samples as a list.
        for name, bounds in (("reload_durations", RELOAD_BUCKETS), ("drain_durations", DRAIN_BUCKETS)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, Durations(**value))
            elif isinstance(value, list):
                durations = Durations(bounds)
                for v in value:
                    durations.observe(float(v))
                setattr(self, name, durations)

    @classmethod
    def restore(cls, data: Mapping[str, object]) -> Stats:
        """Rebuild Stats from `export()`, ignoring fields this master does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})  # type: ignore[arg-type]  # as exported


class Tally:
    """The one writer of the master's `Stats`: each counter subscribes to the event it counts."""

    def __init__(self, bus: ev.Bus) -> None:
        self.stats = Stats()
        self.subscribed: dict[str, list[type[ev.Event]]] = {}   # counter field -> its event types
        on = self._count
        on(bus, ev.ReloadSettled, "reloads", key=lambda e: e.result)
        on(bus, ev.ReexecFailed, "reloads", key=lambda e: "failed")
        on(bus, ev.WorkerExited, "worker_exits", key=lambda e: e.reason)
        on(bus, ev.WorkerRestarted, "worker_restarts")
        on(bus, ev.TemplateStarted, "templates_started", key=lambda e: e.kind)
        on(bus, ev.NotifyRejected, "notify_rejected")
        on(bus, ev.DrainTimedOut, "drain_timeouts")
        on(bus, ev.SlotsRetiredUnsafely, "slot_retire_risks", by=lambda e: e.count)
        on(bus, ev.SteeringRefused, "steering_refused", by=lambda e: e.count)
        on(bus, ev.ConnectionsRescued, "rescued_connections", by=lambda e: e.count)
        on(bus, ev.OrphansTakenOver, "orphans_taken_over", by=lambda e: e.count)
        on(bus, ev.WatchTriggered, "watch_triggers")
        on(bus, ev.RolloutSettled, "rollouts", key=lambda e: e.result)
        on(bus, ev.RolloutCheckFailed, "rollout_check_failures", key=lambda e: e.check)
        on(bus, ev.InternalError, "internal_errors")
        bus.subscribe(ev.HupReceived, self._hup)
        bus.subscribe(ev.ReloadSettled, self._settled)
        bus.subscribe(ev.GenerationRetired, self._retired)

    def restore(self, data: Mapping[str, object]) -> None:
        """Count on from the figures a USR2 predecessor handed over."""
        self.stats = Stats.restore(data)

    def _count(self, bus: ev.Bus, kind: type[E], attr: str, key: Callable[[E], str] | None = None,
               by: Callable[[E], int] = lambda e: 1) -> None:
        def count(event: E) -> None:
            # Looked up at each event: `restore` may have replaced `self.stats` since.
            if key is None:
                setattr(self.stats, attr, getattr(self.stats, attr) + by(event))
            else:
                getattr(self.stats, attr)[key(event)] += by(event)
        self.subscribed.setdefault(attr, []).append(kind)
        bus.subscribe(kind, count)

    def _hup(self, event: ev.HupReceived) -> None:
        self.stats.hups += 1

    def _settled(self, event: ev.ReloadSettled) -> None:
        s = self.stats
        s.last_reload_result, s.last_reload_generation, s.last_reload_covers = \
            event.result, event.generation, event.covers
        s.last_reload_ok = event.result == "success"
        if s.last_reload_ok:
            s.last_reload_success_at = event.at
            s.reload_durations.observe(event.took)
        else:
            s.last_reload_error = event.error

    def _retired(self, event: ev.GenerationRetired) -> None:
        if event.drained_for is not None:
            self.stats.drain_durations.observe(event.drained_for)


def counters() -> Iterator[CounterSpec]:
    """Yield every declared counter of `Stats`."""
    for f in dataclasses.fields(Stats):
        if "metric" in f.metadata:
            yield CounterSpec(f.name, f.metadata["metric"], f.metadata["doc"], f.metadata["label"])
