"""Readiness strategies: when does a new worker count as ready (`ready.mode`)?

A generation is drained only after its successor is ACTIVE, and a generation
is ACTIVE only once every worker is ready, so this decision gates every
reload. Each mode is one class behind one small protocol:

- `notify`: the worker sends READY=1 to NOTIFY_SOCKET. Only this mode trusts
  that message: gunicorn, for one, sends it before its workers have loaded the
  app, which is why such a config says `delay`.
- `delay`: a worker still alive `ready.after` after its start is ready.
- `http`: the master GETs the worker's `ready.url` until it answers 2xx. A
  port for it may be reserved per worker (`{probe_port}`).

A new mode is one class here plus its entry in `config.schema.ReadySpec`.
The strategies decide; the OS work (probe sockets, port reservation) goes
through the `ProbeAPI` and `reserve_port` seams.
"""

from __future__ import annotations

from typing import Callable, Protocol

from upgraderd.config.schema import ReadySpec
from upgraderd.core.seams import ProbeAPI


class Readiness(Protocol):
    """How the workers of one generation become ready."""

    # Why a worker that never became ready did not ("never sent READY=1").
    failure: str

    def trusts_notify(self) -> bool:
        """Return True if READY=1 on the notify socket makes a worker ready."""

    def ready_at(self, started_at: float) -> float | None:
        """Return when a worker started at `started_at` is ready by time alone, or None."""

    def reserve(self) -> dict[str, str]:
        """Return the per-worker placeholder values this mode needs (e.g. probe_port)."""

    def started(self, pid: int, url: str | None, now: float) -> None:
        """Start watching the new worker `pid` (`url`: ready.url, placeholders expanded)."""


class Notify:
    """Ready on READY=1."""

    failure = "never sent READY=1"

    def trusts_notify(self) -> bool:
        """Return True: READY=1 is the signal."""
        return True

    def ready_at(self, started_at: float) -> float | None:
        """Return None: time alone never makes a worker ready."""
        return None

    def reserve(self) -> dict[str, str]:
        """Return no values."""
        return {}

    def started(self, pid: int, url: str | None, now: float) -> None:
        """Do nothing: the worker speaks first."""


class Delay(Notify):
    """Ready once alive for `after` seconds."""

    failure = "did not stay up for ready.after"

    def __init__(self, after: float) -> None:
        self.after = after

    def trusts_notify(self) -> bool:
        """Return False: an early READY=1 is not trusted."""
        return False

    def ready_at(self, started_at: float) -> float | None:
        """Return the start plus `after`."""
        return started_at + self.after


class Http(Delay):
    """Ready once `ready.url` answers 2xx."""

    failure = "never answered 2xx at ready.url"

    def __init__(self, probes: ProbeAPI | None, reserve_port: Callable[[], int] | None) -> None:
        super().__init__(0.0)
        self.probes = probes
        self.reserve_port = reserve_port

    def ready_at(self, started_at: float) -> float | None:
        """Return None: only the probe decides."""
        return None

    def reserve(self) -> dict[str, str]:
        """Reserve a free port for the worker's health endpoint; raise OSError if there is none."""
        if self.reserve_port is None:
            return {}
        return {"probe_port": str(self.reserve_port())}

    def started(self, pid: int, url: str | None, now: float) -> None:
        """Start probing `url` for `pid`."""
        if url is not None and self.probes is not None:
            self.probes.add(pid, url, now)


def for_spec(spec: ReadySpec, probes: ProbeAPI | None = None,
             reserve_port: Callable[[], int] | None = None) -> Readiness:
    """Return the strategy that `spec` (the `ready` section) selects (without probes: decide only)."""
    if spec.mode == "http":
        return Http(probes, reserve_port)
    if spec.mode == "delay":
        return Delay(spec.after)
    return Notify()
