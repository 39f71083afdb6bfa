"""Compute what a reload changes: a pure diff of two configs, with no I/O.

Listeners are matched by address and mode (the socket's identity), not by
name, so renaming a listener keeps its sockets. Every reload starts a new
generation, even when nothing changed, because the code on disk may be new.

`Plan.describe()` is one log line: it names every changed key with its old
and new value (`drain.timeout: 30s -> 10s`). The values of `workers.env` are
never shown, only which variables changed, because they often hold secrets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from upgraderd.config.docgen import format_duration
from upgraderd.config.schema import Config, ListenerSpec
from upgraderd.config.validators import duration

#: Keys the plan reports in its own words rather than as a change.
_OWN_WORDS = {"listeners", "workers.count"}


@dataclass(frozen=True)
class Plan:
    """What applying a new config does."""

    keep: tuple[ListenerSpec, ...]
    open: tuple[ListenerSpec, ...]
    close: tuple[ListenerSpec, ...]
    workers_before: int | None
    workers_after: int
    changes: tuple[str, ...] = ()

    def describe(self) -> str:
        """Return the plan as one line: listeners, workers, every changed key."""
        listeners = [f"{title} {s.name} {s.address} ({s.mode})"
                     for title, specs in (("keep", self.keep), ("open", self.open),
                                          ("close after drain", self.close)) for s in specs]
        parts = ["listeners " + ", ".join(listeners)]
        if self.workers_before is None or self.workers_before == self.workers_after:
            parts.append(f"workers {self.workers_after}")
        else:
            parts.append(f"workers {self.workers_before} -> {self.workers_after}")
        if self.changes:
            parts.append("changed " + ", ".join(self.changes))
        elif self.workers_before is not None:
            parts.append("no key changed")
        parts.append("generation new")
        return "plan: " + "; ".join(parts)


def _identity(spec: ListenerSpec) -> tuple[str, int, str]:
    return spec.socket_id


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
        changes=tuple(changes(current, new)) if current is not None else (),
    )


def changes(current: Config, new: Config) -> list[str]:
    """Return `key: old -> new` for every option that differs, in declaration order."""
    out = _section_changes(current, new, "")
    old = {_identity(s): s for s in current.listeners}
    for spec in new.listeners:
        before = old.get(_identity(spec))
        if before is not None:
            out += _section_changes(before, spec, f"listeners[{spec.address}].")
    return out


def _section_changes(a: Any, b: Any, prefix: str) -> list[str]:
    out: list[str] = []
    for f in dataclasses.fields(a):
        if f.metadata.get("internal"):
            continue
        key = prefix + f.name
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if key in _OWN_WORDS or va == vb:
            continue
        if dataclasses.is_dataclass(va) and dataclasses.is_dataclass(vb):
            out += _section_changes(va, vb, key + ".")
        elif key == "workers.env":
            out += _env_changes(va, vb, key)
        else:
            check = f.metadata.get("check")
            out.append(f"{key}: {show(va, check)} -> {show(vb, check)}")
    return out


def _env_changes(a: dict[str, str], b: dict[str, str], key: str) -> list[str]:
    out = []
    for name in sorted(set(a) | set(b)):
        if name not in b:
            out.append(f"{key}.{name}: removed")
        elif name not in a:
            out.append(f"{key}.{name}: set")
        elif a[name] != b[name]:
            out.append(f"{key}.{name}: changed (value not shown)")
    return out


def show(value: Any, check: Any = None) -> str:
    """Return a config value as the YAML-like text an operator wrote."""
    if value is None:
        return "null"
    if check is duration and isinstance(value, float):
        return format_duration(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, str) and (value == "" or value != value.strip() or "," in value):
        return repr(value)
    return str(value)

