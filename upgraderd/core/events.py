"""What happened in the master: the events its owners report, and the bus that carries them.

The owners (core/fleet.py, core/reloads.py, core/slots.py, core/selfexec.py,
core/takeover.py) change state; each change that anyone outside the owner
cares about is reported as one event here. Counters (core/stats.py `Tally`),
log lines (core/eventlog.py), the metrics endpoint (core/publish.py), and the service around the master
(pidfile, status file, log settings: service/reporting.py) subscribe to them.
So a new counter is its declaration in core/stats.py plus one subscription
line there, and no owner holds a counter.

Design note (supervisor's events.py, without its module-global subscriber
list): the bus is an object, made by whoever wires the daemon
(service/runner.py) and passed in, so two masters in one test never share
subscribers. Delivery is synchronous, in subscription order, inside the
master's loop: a subscriber must return quickly. An exception in a subscriber
propagates to the owner that emitted, where the master's per-phase guard logs
and counts it like any other bug in that phase.

Invariant: events carry plain values (numbers, strings, the pass's frozen
snapshot: `PassEnded`, declared in core/snapshot.py next to what it carries),
never an owner, so a subscriber cannot reach back into the state it reports.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, TypeVar


class Event:
    """The base of every event."""


E = TypeVar("E", bound=Event)


class Bus:
    """Subscribers by event type; `emit` calls each subscriber of the event's exact type."""

    def __init__(self) -> None:
        self._subscribers: defaultdict[type[Event], list[Callable[[Event], None]]] = defaultdict(list)

    def subscribe(self, kind: type[E], fn: Callable[[E], None]) -> None:
        """Call `fn` with every event of type `kind`, after the earlier subscribers."""
        self._subscribers[kind].append(fn)  # type: ignore[arg-type]  # keyed by kind: fn gets only E

    def emit(self, event: Event) -> None:
        """Deliver `event` to its subscribers, in subscription order."""
        for fn in self._subscribers.get(type(event), ()):
            fn(event)

    def kinds(self) -> set[type[Event]]:
        """Return the event types that have a subscriber."""
        return {k for k, fns in self._subscribers.items() if fns}


# -- the reloads (core/reloads.py, core/selfexec.py, core/watching.py) --

@dataclass(frozen=True)
class HupReceived(Event):
    """A SIGHUP arrived (while not stopping): a reload is queued."""


@dataclass(frozen=True)
class WatchTriggered(Event):
    """A watched path really changed (`reload.watch`): a reload is queued."""

    paths: tuple[str, ...] = ()
    config_path: str = ""


@dataclass(frozen=True)
class ReloadSettled(Event):
    """A reload ended: success, failed (its generation did not become ACTIVE) or rejected."""

    result: str = "success"
    generation: int = 0
    covers: int = 0            # the HUPs seen when it read its config
    error: str = ""
    took: float = 0.0          # seconds since it was asked for (success only)
    at: float = 0.0            # wall clock


@dataclass(frozen=True)
class RolloutSettled(Event):
    """A canary's verdict (core/rollout.py): promoted, or rolled_back by a failing check."""

    result: str = "promoted"
    generation: int = 0
    check: str = ""            # the failing check (rolled_back only): crashes, http, command, ready
    detail: str = ""           # its figures
    took: float = 0.0          # seconds since the canary began to serve


@dataclass(frozen=True)
class RolloutCheckFailed(Event):
    """A rollout check failed and rolled the canary back (reported with its `RolloutSettled`)."""

    check: str = "crashes"


@dataclass(frozen=True)
class ReexecFailed(Event):
    """The exec of a USR2 re-exec returned: the old master carries on (a failed reload)."""

    error: str = ""
    command: str = ""          # what the exec would have run


# -- the fleet (core/fleet.py, core/prefork.py, core/notices.py) --

@dataclass(frozen=True)
class WorkerExited(Event):
    """A worker (or any child that is not the USR2 preflight) was reaped."""

    pid: int = 0
    reason: str = "clean"      # clean, error or signal


@dataclass(frozen=True)
class WorkerRestarted(Event):
    """A dead worker of an ACTIVE generation was respawned into its slot."""


@dataclass(frozen=True)
class DrainTimedOut(Event):
    """A worker still ran at its drain deadline and got SIGKILL."""

    pid: int = 0


@dataclass(frozen=True)
class TemplateStarted(Event):
    """A prefork generation got its template: cold (a fresh exec) or warm (a standby)."""

    generation: int = 0
    pid: int = 0
    kind: str = "cold"


@dataclass(frozen=True)
class NotifyRejected(Event):
    """A notify datagram was ignored: not from a worker, or malformed."""


@dataclass(frozen=True)
class GenerationRetired(Event):
    """A generation retired and is forgotten; `drained_for` is None if it never served."""

    number: int = 0
    drained_for: float | None = None


@dataclass(frozen=True)
class Serving(Event):
    """Generation 1 became ACTIVE: the master serves."""


@dataclass(frozen=True)
class StartFailed(Event):
    """Generation 1 failed: the master stops."""

    reason: str = ""


@dataclass(frozen=True)
class StopBegun(Event):
    """The master begins to stop (graceful, fast, or failed), before it signals any worker:
    the service marks it where draining workers look (contract/wire.py `stop_marker`)."""

    mode: str = ""


# -- the slots (core/slots.py, core/rescue.py) --

@dataclass(frozen=True)
class SlotsRetiredUnsafely(Event):
    """reuseport slot sockets closed while the kernel could reset what queued on them."""

    count: int = 1


@dataclass(frozen=True)
class SteeringRefused(Event):
    """The kernel refused reuseport steering programs."""

    count: int = 1


@dataclass(frozen=True)
class ConnectionsRescued(Event):
    """Connections taken from a dead slot's queue, to hand to READY siblings."""

    count: int = 1
    generation: int = 0
    slot: int = 0
    listener: str = ""
    address: str = ""
    takers: tuple[int, ...] = ()


# -- the rest --

@dataclass(frozen=True)
class OrphansTakenOver(Event):
    """A dead master's orphaned workers were drained (core/takeover.py)."""

    count: int = 1
    pids: tuple[int, ...] = ()


@dataclass(frozen=True)
class InternalError(Event):
    """An exception inside a pass of the loop, logged and survived (a bug)."""

    what: str = ""


@dataclass(frozen=True)
class LogReopenAsked(Event):
    """SIGUSR1: reopen the log file."""
