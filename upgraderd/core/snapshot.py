"""A frozen, plain-valued picture of the master's state, for the metrics thread.

Design note: the master's state is owned and mutated by the loop thread only.
Rather than lock it, the loop builds a `Snapshot` at the end of every pass and
publishes it by rebinding one attribute (atomic in CPython); the HTTP thread
only ever reads the latest reference. A snapshot therefore lags the master by
at most one loop pass, and the loop passes at least once a second (its select
timeout), which is also how /healthz tells that the loop still runs.

Everything in a snapshot is a copy: the master may go on mutating its own
dicts and lists while a scrape reads this one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from upgraderd.core.durations import HistogramData
from upgraderd.core.generation import GenerationState, WorkerState

if TYPE_CHECKING:
    from upgraderd.core.master import Master

# Generations are forgotten in the same loop pass in which they retire, so a
# RETIRED count would always read 0: it is not reported.
REPORTED_GENERATION_STATES = tuple(s for s in GenerationState if s is not GenerationState.RETIRED)


@dataclass(frozen=True)
class ListenerInfo:
    """One listener of the current config."""

    name: str
    address: str
    mode: str


@dataclass(frozen=True)
class Snapshot:
    """The master's state at the end of one loop pass."""

    taken_at: float                      # the master's clock (monotonic)
    active_generation: int               # 0 while no generation is ACTIVE
    generations: dict[str, int]          # GenerationState value -> count
    workers: dict[str, int]              # WorkerState value -> count
    listeners: tuple[ListenerInfo, ...]
    reloads: dict[str, int]
    worker_exits: dict[str, int]
    worker_restarts: int
    notify_rejected: int
    drain_timeouts: int
    last_reload_ok: bool
    last_reload_success_at: float        # wall clock (time.time)
    reload_durations: HistogramData
    drain_durations: HistogramData
    stopping: bool
    tcp_migrate_req: int                 # -1 where the kernel has no such setting
    worker_bind_reset_risk: bool
    slot_retire_risks: int

    @property
    def draining_workers(self) -> int:
        """Return the number of worker processes that are draining."""
        return self.workers[WorkerState.DRAINING.value]


def take(master: Master) -> Snapshot:
    """Copy what the metrics report out of `master` (call it in the loop thread)."""
    gens = {s.value: 0 for s in REPORTED_GENERATION_STATES}
    workers = {s.value: 0 for s in WorkerState}
    for g in master.generations:
        if g.state.value in gens:
            gens[g.state.value] += 1
        for w in g.workers.values():
            workers[w.state.value] += 1
    active = master.active
    cfg = master.config
    listeners = tuple(ListenerInfo(s.name, s.address, s.mode) for s in cfg.listeners) if cfg else ()
    st = master.stats
    return Snapshot(
        taken_at=master.clock(),
        active_generation=active.number if active is not None else 0,
        generations=gens, workers=workers, listeners=listeners,
        reloads=dict(st.reloads), worker_exits=dict(st.worker_exits),
        worker_restarts=st.worker_restarts, notify_rejected=st.notify_rejected,
        drain_timeouts=st.drain_timeouts, last_reload_ok=st.last_reload_ok,
        # The config that started the master is the first one that loaded.
        last_reload_success_at=st.last_reload_success_at or master.wall_started_at,
        reload_durations=st.reload_durations.data(), drain_durations=st.drain_durations.data(),
        stopping=master.stopping,
        tcp_migrate_req=-1 if master.tcp_migrate_req is None else master.tcp_migrate_req,
        worker_bind_reset_risk=master.worker_bind_reset_risk,
        slot_retire_risks=st.slot_retire_risks,
    )


def age(snap: Snapshot, now: float | None = None) -> float:
    """Return how many seconds ago (monotonic) `snap` was taken."""
    return (time.monotonic() if now is None else now) - snap.taken_at
