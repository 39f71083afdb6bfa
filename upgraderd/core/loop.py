"""The master as the select loop (system/posix.py `run`) and the daemon runner see it.

A Protocol of its own, so that the OS side drives the master without importing it
(no module outside core/master.py imports `Master`).
"""

from __future__ import annotations

import signal as signal_mod
from typing import Protocol

from upgraderd.config.schema import Config


class Loop(Protocol):
    """What the select loop (system/posix.py `run`) drives: the master, seen from outside the core."""

    @property
    def running(self) -> bool:
        """Return True while a generation is left: the loop ends when none is."""

    @property
    def exit_code(self) -> int:
        """Return the code the master exits with."""

    @property
    def config(self) -> Config | None:
        """Return the config of the serving generation."""

    def start(self) -> None:
        """Start the metrics and generation 1 (or adopt a USR2 predecessor's)."""

    def step(self, signals: set[signal_mod.Signals]) -> None:
        """Run one pass after `select` returned with `signals`."""

    def timeout(self, now: float | None = None) -> float:
        """Return how long the loop may block in select."""

    def close(self) -> None:
        """Release what the master started (at exit)."""
