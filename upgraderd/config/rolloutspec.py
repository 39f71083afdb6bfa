"""The `rollout:` section: how a reload hands traffic to the new generation, and what judges it.

    rollout:
      strategy: canary          # all-at-once (the default: today's reload) | canary | batches
      canary: {workers: 1, window: 30s}
      batches: {size: 1, pause: 5s}   # strategy batches: replace `size` workers at a time
      checks:
        crashes: 0              # worker exits of the new generation tolerated
        http: {url: "http://127.0.0.1:{probe_port}/healthz", every: 1s, timeout: 500ms}
        command: ["/usr/local/bin/smoke-test", "{generation}"]
        error_ratio: {max: 0.02, vs_previous: 2.0}   # config/trafficspec.py
        latency_p99: {vs_previous: 1.5}
      rollback: auto            # or manual: a failing check holds the rollout for the operator
      keep_previous: 10m        # keep the previous release's template for `upgraderd rollback`

The decisions live in upgraderd/core/rollout.py and the checks in
upgraderd/core/rolloutchecks.py; this module only declares and validates the keys.

Invariant: a key of the design that is not built yet (a "10%" share) is
refused with an error that names it and says "not supported yet"; it is
never accepted and silently ignored, because an operator who writes it
believes the release is judged by it.

Nested sections are fields declared with `section()`: the loader
(schema.py) recurses into them with the same located errors, docgen.py
documents each in its own table, and core/handover.py rebuilds them from plain
data after a USR2 re-exec (`from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from upgraderd.config.trafficspec import ErrorRatioSpec, LatencySpec
from upgraderd.config.validators import REQUIRED, Invalid, argv, duration, integer, opt, string, _show

STRATEGIES = ("all-at-once", "canary", "batches")
CHECK_NAMES = ("crashes", "http", "command", "error_ratio", "latency_p99")   # the metric's label values, in order


def section(cls: type, doc: str) -> Any:
    """Declare a nested mapping of type `cls` (its defaults apply when the key is absent)."""
    return field(default_factory=cls, metadata={"check": lambda v: v, "doc": doc, "section": cls})


def optional_section(cls: type, doc: str) -> Any:
    """Declare a nested mapping of type `cls` that is off (None) unless written."""
    return field(default=None, metadata={"check": lambda v: v, "doc": doc, "section": cls})


def strategy(v: Any) -> str:
    """all-at-once, canary or batches"""
    if v not in STRATEGIES:
        raise Invalid(f"{_show(v)} is not allowed; allowed: {', '.join(STRATEGIES)}")
    return str(v)


def canary_workers(v: Any) -> int:
    """integer 1..1024 (workers of the new generation during the window)"""
    if isinstance(v, str) and v.strip().endswith("%"):
        raise Invalid(f"a share of new connections ({_show(v)}) is not supported yet; "
                      "give a number of workers, e.g. 1")
    n: int = integer(1, 1024)(v)
    return n


def rollback_mode(v: Any) -> str:
    """auto (a failing check rolls back at once) or manual (the rollout holds for the operator)"""
    if v not in ("auto", "manual"):
        raise Invalid(f"{_show(v)} is not allowed; allowed: auto, manual")
    return str(v)


@dataclass(frozen=True, kw_only=True)
class CanarySpec:
    """The canary: a few workers of the new generation beside the serving one."""

    NOT_YET: ClassVar[dict[str, str]] = {}
    workers: int = opt(1, canary_workers, "Workers the new generation starts with while the "
                       "previous one keeps serving (less than workers.count).")
    window: float = opt(30.0, duration, "How long the checks watch the canary before it is "
                        "promoted to workers.count.")


@dataclass(frozen=True, kw_only=True)
class BatchesSpec:
    """Batches: the new generation replaces the old one `size` workers at a time (core/batches.py)."""

    NOT_YET: ClassVar[dict[str, str]] = {}
    size: int = opt(1, integer(1, 1024), "Workers replaced per batch: at most workers.count + size "
                    "workers are alive at any moment of the roll.")
    pause: float = opt(5.0, duration, "How long the checks watch each batch, once its workers are "
                       "ready, before the old workers it replaces drain.")


@dataclass(frozen=True, kw_only=True)
class HttpCheckSpec:
    """An HTTP GET of each canary worker, answered 2xx, or the rollout fails."""

    NOT_YET: ClassVar[dict[str, str]] = {}
    url: str = opt(REQUIRED, string, "http://HOST:PORT/PATH, placeholders as in ready.url "
                   "(e.g. http://127.0.0.1:{probe_port}/healthz).")
    every: float = opt(1.0, duration, "Time between two probes of one worker.")
    timeout: float = opt(0.5, duration, "A probe not answered by then fails.")


@dataclass(frozen=True, kw_only=True)
class ChecksSpec:
    """What fails a rollout while the canary is watched (any one failing check does)."""

    NOT_YET: ClassVar[dict[str, str]] = {}
    crashes: int = opt(0, integer(0, 1000), "Worker exits of the new generation tolerated "
                       "during the rollout; one more fails it.")
    http: HttpCheckSpec | None = optional_section(HttpCheckSpec, "Probe each canary worker over HTTP.")
    command: tuple[str, ...] | None = opt(None, argv, "Run this once the canary serves; it must exit 0 "
                                          "within the window ({generation} is the new generation).")
    error_ratio: ErrorRatioSpec | None = optional_section(ErrorRatioSpec, "The new generation's 5xx share, "
                                                          "from its workers' request counts.")
    latency_p99: LatencySpec | None = optional_section(LatencySpec, "The new generation's p99 request "
                                                       "duration against the serving generation's.")


@dataclass(frozen=True, kw_only=True)
class RolloutSpec:
    """How a reload hands traffic to the new generation (docs/rollouts.md)."""

    NOT_YET: ClassVar[dict[str, str]] = {}
    strategy: str = opt("all-at-once", strategy, "all-at-once: every worker at once, the old "
                        "generation drains as soon as the new one is ready; canary: see `canary`; "
                        "batches: see `batches`.")
    canary: CanarySpec = section(CanarySpec, "The canary's size and window.")
    batches: BatchesSpec = section(BatchesSpec, "The batches' size and pause.")
    checks: ChecksSpec = section(ChecksSpec, "What fails a canary, or a batch.")
    rollback: str = opt("auto", rollback_mode, "What a failing check does: auto drains the canary "
                        "and the previous generation carries on; manual holds the rollout (both "
                        "generations serve) until `upgraderd promote` or `upgraderd rollback`.")
    keep_previous: float = opt(0.0, duration, "After a reload or promotion, keep the previous release's "
                               "template this long (0: not at all), so that `upgraderd rollback` forks "
                               "it again: no import, no exec (prefork apps only; docs/rollouts.md).")


def from_dict(cls: type, data: Mapping[str, object]) -> Any:
    """Rebuild a section of type `cls` from `dataclasses.asdict` output (a USR2 hand-over)."""
    kwargs: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = f.metadata.get("section")
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value)
        elif isinstance(value, list):   # tuples, which JSON turned into lists
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)
