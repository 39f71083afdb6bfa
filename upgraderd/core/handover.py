"""The hand-over record of a USR2 re-exec of the master: what the old master passes to the new one.

The old master serialises this record (JSON) and execs the new code in the
same process (system/reexec.py). The new master adopts the listeners, the
notify socket, every live worker with its generation and deadlines, and the
counters, then rolls a new generation as on SIGHUP.

Invariants:
- CLOCK_MONOTONIC is system-wide, so deadlines are carried as absolute values.
- A generation's config was valid when it was loaded; it is carried as data
  and not re-validated, because its command may since have left the disk.
- `VERSION` changes whenever a field changes meaning; a new master refuses a
  record of another version rather than guess.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Mapping

from upgraderd.config import rolloutspec as rollout
from upgraderd.config.schema import SECTIONS, Config, ListenerSpec

VERSION = 1


def number(value: object) -> float:
    """Return a number of a record; raise ValueError if `value` is none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"malformed hand-over: {value!r} is not a number")
    return float(value)


def optional_number(value: object) -> float | None:
    """Return a number of a record, or None."""
    return None if value is None else number(value)


def records(value: object) -> list[dict[str, object]]:
    """Return a list of JSON objects of a record; raise ValueError if `value` is not one."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError("malformed hand-over: not a list of objects")
    return [dict(v) for v in value]


def config_to_dict(cfg: Config) -> dict[str, object]:
    """Return `cfg` as JSON-able plain data."""
    data: dict[str, object] = json.loads(json.dumps(dataclasses.asdict(cfg)))
    return data


def config_from_dict(data: Mapping[str, object]) -> Config:
    """Rebuild a Config from `config_to_dict` output, without re-validating it."""
    kwargs: dict[str, object] = {}
    for name, value in data.items():
        if name == "listeners":
            kwargs[name] = tuple(ListenerSpec(**item) for item in records(value))  # type: ignore[arg-type]
        elif name in SECTIONS:   # nested sections rebuilt, tuples (JSON lists) made tuples again
            kwargs[name] = rollout.from_dict(SECTIONS[name], value if isinstance(value, dict) else {})
        else:
            kwargs[name] = value
    return Config(**kwargs)  # type: ignore[arg-type]  # the fields `config_to_dict` wrote


@dataclass
class Handover:
    """Everything a new master takes over from the old one."""

    listeners: list[dict[str, object]]       # ListenerAPI.export(): key, fd, backlog
    notify_fd: int
    next_number: int
    stats: dict[str, object]                 # Stats.export()
    started_at: float                        # monotonic
    wall_started_at: float
    generations: list[dict[str, object]]     # Generation.export() plus "config"
    metrics: dict[str, object] | None = None
    fds: dict[str, int] = field(default_factory=dict)   # by name, e.g. the pidfile lock

    def inherited_fds(self) -> list[int]:
        """Return every fd the exec must keep open."""
        return [int(number(e["fd"])) for e in self.listeners] + [self.notify_fd, *self.fds.values()]

    def to_json(self) -> bytes:
        """Serialise the record, with its version."""
        return json.dumps({"version": VERSION, **dataclasses.asdict(self)}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Handover:
        """Parse a record; raise ValueError if it is of another version or malformed."""
        data = json.loads(raw)
        if not isinstance(data, dict) or data.pop("version", None) != VERSION:
            raise ValueError(f"the old master's hand-over is not version {VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as e:
            raise ValueError(f"malformed hand-over: {e}") from None
