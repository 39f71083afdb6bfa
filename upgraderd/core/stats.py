"""The master's event counts and timings.

Invariant: every count only grows while the master lives, and a USR2 re-exec
hands them to the new master (`Stats(**dataclasses.asdict(stats))`), so the
Prometheus counters built from them never reset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from upgraderd.core.durations import DRAIN_BUCKETS, RELOAD_BUCKETS, Durations


@dataclass
class Stats:
    """Event counts and timings; they only ever grow while the master lives."""

    reloads: dict[str, int] = field(default_factory=lambda: {"success": 0, "failed": 0, "rejected": 0})
    worker_exits: dict[str, int] = field(default_factory=lambda: {"clean": 0, "error": 0, "signal": 0})
    worker_restarts: int = 0
    notify_rejected: int = 0
    slot_retire_risks: int = 0
    drain_timeouts: int = 0
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

    def __post_init__(self) -> None:
        # A state hand-over, Stats(**dataclasses.asdict(stats)), passes the histograms as
        # dicts; one from an older master passes the samples as a list.
        for name, bounds in (("reload_durations", RELOAD_BUCKETS), ("drain_durations", DRAIN_BUCKETS)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, Durations(**value))
            elif isinstance(value, list):
                durations = Durations(bounds)
                for v in value:
                    durations.observe(float(v))
                setattr(self, name, durations)
