"""The one projection of the master's state: what /metrics, the status file and
`upgraderd status` report.

Design note: the master's state is owned and mutated by the loop thread only.
Rather than lock it, the loop builds a `Snapshot` at the end of every pass and
publishes it (core/publish.py) by rebinding one attribute (atomic in CPython); the metrics
thread only ever reads the latest reference, and the status file is written
from the same object. A snapshot therefore lags the master by at most one
loop pass, and the loop passes at least once a second (its select timeout),
which is also how /healthz tells that the loop still runs.

Everything in a snapshot is a copy: the master may go on mutating its own
dicts and lists while a scrape reads this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple

from upgraderd.config.schema import Config
from upgraderd.core.events import Event
from upgraderd.core.generation import Generation, GenerationState, WorkerState
from upgraderd.core.previous import Kept
from upgraderd.core.rollout import Progress
from upgraderd.core.stats import Stats

# Generations are forgotten in the same loop pass in which they retire, so a
# RETIRED count would always read 0: it is not reported.
REPORTED_GENERATION_STATES = tuple(s for s in GenerationState if s is not GenerationState.RETIRED)


@dataclass(frozen=True)
class ListenerInfo:
    """One listener of the current config."""

    name: str
    address: str
    mode: str
    protocol: str   # tcp, udp or unix (a `path` listener)


class WorkerInfo(NamedTuple):
    """One worker slot; times are the master's monotonic clock.

    A named tuple, not a frozen dataclass: a snapshot makes one per worker every
    loop pass, and a tuple is built several times faster.
    """

    slot: int
    pid: int | None
    state: WorkerState
    started_at: float


@dataclass(frozen=True)
class GenerationInfo:
    """One generation; times are the master's monotonic clock."""

    number: int
    state: GenerationState
    changed_at: float
    created_at: float
    reason: str
    workers: tuple[WorkerInfo, ...]
    runs: int = 0                        # a rollback's: the generation whose release it runs


@dataclass(frozen=True)
class Snapshot:
    """The master's state at the end of one loop pass."""

    taken_at: float                      # the master's clock (monotonic)
    wall_offset: float                   # add to a monotonic time to get wall-clock time
    config_path: str
    started_at: float                    # wall clock
    generation_list: tuple[GenerationInfo, ...]
    listeners: tuple[ListenerInfo, ...]
    stats: Stats                         # a private copy
    stopping: bool
    tcp_migrate_req: int                 # -1 where the kernel has no such setting
    worker_bind_reset_risk: bool
    rollout: Progress | None = None      # a canary under way (core/rollout.py)
    foreign_listeners: tuple[str, ...] = ()  # strangers in the ACTIVE config's port groups (core/slots.py)
    previous: Kept | None = None         # the previous release's kept template (core/previous.py)

    @property
    def serving_release(self) -> int:
        """Return the generation whose release the serving generation runs (its own, or a rollback's)."""
        number = self.active_generation
        return next((g.runs or g.number for g in self.generation_list if g.number == number), 0)

    @property
    def active_generation(self) -> int:
        """Return the number of the serving ACTIVE generation (not a canary), 0 while there is none."""
        canary = self.rollout.generation if self.rollout is not None else None
        active = [g.number for g in self.generation_list if g.state is GenerationState.ACTIVE
                  and g.number != canary]
        return active[-1] if active else 0

    @property
    def generations(self) -> dict[str, int]:
        """Return the count of generations by state value."""
        out = {s.value: 0 for s in REPORTED_GENERATION_STATES}
        for g in self.generation_list:
            if g.state.value in out:
                out[g.state.value] += 1
        return out

    @property
    def workers(self) -> dict[str, int]:
        """Return the count of worker slots by state value."""
        out = {s.value: 0 for s in WorkerState}
        for g in self.generation_list:
            for w in g.workers:
                out[w.state.value] += 1
        return out

    @property
    def ready_workers(self) -> int:
        """Return the READY workers of the ACTIVE generation (0: nothing serves)."""
        return sum(1 for g in self.generation_list if g.state is GenerationState.ACTIVE
                   for w in g.workers if w.state is WorkerState.READY)

    @property
    def draining_workers(self) -> int:
        """Return the number of worker processes that are draining."""
        return self.workers[WorkerState.DRAINING.value]

    @property
    def last_reload_success_at(self) -> float:
        """Return when the config in service was loaded (wall clock): the start counts."""
        return self.stats.last_reload_success_at or self.started_at


@dataclass(frozen=True)
class PassEnded(Event):
    """A pass of the loop ended; `snapshot` is what it published, `config` the one in service."""

    snapshot: Snapshot
    config: Config | None = None


@dataclass(frozen=True)
class Times:
    """When the master started, on both clocks (carried over a USR2 re-exec), and now."""

    started_at: float          # monotonic
    wall_started_at: float
    now: float                 # monotonic


def take(times: Times, config_path: str, generations: Iterable[Generation], config: Config | None,
         stats: Stats, stopping: bool, tcp_migrate_req: int | None, worker_bind_reset_risk: bool,
         rollout: Progress | None = None, foreign_listeners: tuple[str, ...] = (),
         previous: Kept | None = None) -> Snapshot:
    """Copy the reported state out of the owners' (call it in the loop thread)."""
    gens = tuple(GenerationInfo(
        g.number, g.state, g.changed_at, g.created_at, g.reason,
        tuple(WorkerInfo(w.slot, w.pid, w.state, w.started_at) for w in g.workers.values()), g.runs,
    ) for g in generations)
    listeners = tuple(ListenerInfo(s.name, s.address, s.mode, "unix" if s.path is not None else s.protocol)
                      for s in config.listeners) if config else ()
    return Snapshot(
        taken_at=times.now, wall_offset=times.wall_started_at - times.started_at,
        config_path=config_path, started_at=times.wall_started_at,
        generation_list=gens, listeners=listeners, stats=stats.copy(), stopping=stopping,
        tcp_migrate_req=-1 if tcp_migrate_req is None else tcp_migrate_req,
        worker_bind_reset_risk=worker_bind_reset_risk, rollout=rollout, foreign_listeners=foreign_listeners,
        previous=previous,
    )
