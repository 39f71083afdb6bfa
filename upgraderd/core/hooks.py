"""What the master tells the process around it: the seam for pidfile, status and logs.

The master calls these at fixed points of its loop. The defaults do nothing,
so a Master built by a unit test needs no hooks. A hook runs inside the
master's loop: it must return quickly and must not raise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from upgraderd.config.schema import Config
    from upgraderd.core.snapshot import Snapshot


class Hooks:
    """No-op hooks; service.Service is the real implementation."""

    def on_step(self, snap: Snapshot, config: Config | None) -> None:
        """Run after every pass of the loop with its snapshot and the config in service."""

    def on_serving(self) -> None:
        """Run once, when generation 1 has become ACTIVE."""

    def on_start_failed(self, reason: str) -> None:
        """Run once, when generation 1 has failed (the master is about to stop)."""

    def on_reopen_logs(self) -> None:
        """Run when SIGUSR1 asks for the log file to be reopened."""

    def handover_fds(self) -> dict[str, int]:
        """Return the fds a USR2 re-exec must pass on to the new master, by name."""
        return {}
