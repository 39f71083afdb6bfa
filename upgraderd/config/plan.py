"""Compute what a reload changes: a pure diff of two configs, with no I/O.

Listeners are matched by address and mode (the socket's identity), not by
name, so renaming a listener keeps its sockets. Every reload starts a new
generation, even when nothing changed, because the code on disk may be new.
"""

from __future__ import annotations

from dataclasses import dataclass

from upgraderd.config.schema import Config, ListenerSpec


@dataclass(frozen=True)
class Plan:
    """What applying a new config does."""

    keep: tuple[ListenerSpec, ...]
    open: tuple[ListenerSpec, ...]
    close: tuple[ListenerSpec, ...]
    workers_before: int | None
    workers_after: int
    command_changed: bool

    def describe(self) -> str:
        """Return the plan as a readable block of lines."""
        lines = []
        for title, specs in (("keep", self.keep), ("open", self.open),
                             ("close after drain", self.close)):
            for s in specs:
                lines.append(f"  {title:<17} listener {s.name} {s.address} ({s.mode})")
        if self.workers_before is None or self.workers_before == self.workers_after:
            lines.append(f"  workers           {self.workers_after}")
        else:
            lines.append(f"  workers           {self.workers_before} -> {self.workers_after}")
        if self.command_changed:
            lines.append("  command           changed")
        lines.append("  generation        new")
        return "plan:\n" + "\n".join(lines)


def _identity(spec: ListenerSpec) -> tuple[str, int, str]:
    return (spec.host, spec.port, spec.mode)


def diff(current: Config | None, new: Config) -> Plan:
    """Return the plan that takes the master from `current` to `new`."""
    old = {_identity(s): s for s in (current.listeners if current else ())}
    ids = {_identity(s) for s in new.listeners}
    return Plan(
        keep=tuple(s for s in new.listeners if _identity(s) in old),
        open=tuple(s for s in new.listeners if _identity(s) not in old),
        close=tuple(s for k, s in old.items() if k not in ids),
        workers_before=current.workers.count if current else None,
        workers_after=new.workers.count,
        command_changed=current is not None and current.worker_argv != new.worker_argv,
    )
