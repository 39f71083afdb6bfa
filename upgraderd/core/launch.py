"""Describe one worker's start (a `Launch`): argv, environment, fds and readiness URL, from one place.

Design note: a worker's environment used to be assembled from six sources in
four modules, and the fd numbers in `{fd:NAME}` agreed with the fds actually
passed only by convention. Here one function builds a `Launch` from the
config, the generation and the slot. The fd order comes from
`Config.fd_listeners`, which `{fd:NAME}` uses too, so the two cannot
disagree. Nothing here touches the OS: the sockets' fd numbers come from the
`ListenerAPI` seam and the environment of the master is passed in.

Names: a `Launch` is the description made here; a `Launcher`
(core/generation.py) is what a generation starts and signals its workers
through; `FleetLauncher` (core/fleet.py) is the one that does, with a
`Launch` from here, through the process or template seam.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from upgraderd.config import placeholders
from upgraderd.config.schema import Config
from upgraderd.contract import env as contract
from upgraderd.core.readiness import Readiness

# Variables of the master's own environment that must not leak to workers.
PRIVATE_ENV = (*contract.LISTEN_VARS, contract.NOTIFY_SOCKET, contract.METRICS_DIR)


@dataclass(frozen=True)
class Launch:
    """Everything needed to start one worker."""

    argv: tuple[str, ...]
    env: dict[str, str]
    fds: tuple[int, ...]
    cwd: str | None
    user: str | None
    group: str | None
    ready_url: str | None


@dataclass(frozen=True)
class Context:
    """What a launch needs besides the config: the master's environment and seams' values."""

    environ: Mapping[str, str]          # the master's own environment
    notify_address: str                 # NOTIFY_SOCKET for the workers
    user_env: Mapping[str, str]         # HOME, USER, LOGNAME of workers.user ({} for the master's own)
    metrics_env: Mapping[str, str]      # what the metrics need (UPGRADERD_METRICS_DIR)


def describe(cfg: Config, generation: int, slot: int, fds: tuple[int, ...],
             readiness: Readiness, ctx: Context) -> Launch:
    """Return the launch of worker `slot` of generation `generation`; raise OSError if
    readiness cannot reserve what it needs, TemplateError if a placeholder cannot expand."""
    values = placeholders.values(cfg, slot, generation)
    values.update(readiness.reserve())
    w = cfg.workers
    env = {k: v for k, v in ctx.environ.items() if k not in PRIVATE_ENV}
    env.update(ctx.user_env)
    env.update(w.env)
    env.update(placeholders.environment(cfg, values))
    env.update({
        contract.LISTEN_FDS: str(len(fds)), contract.LISTEN_FDNAMES: ":".join(s.name for s in cfg.fd_listeners),
        contract.NOTIFY_SOCKET: ctx.notify_address,
        contract.GENERATION: str(generation), contract.SLOT: str(slot),
        contract.DRAIN_SIGNAL: cfg.drain.signal,
        contract.HANDOFF: cfg.drain.handoff,
        contract.ORPHAN_GRACE: f"{cfg.drain.orphan_grace:g}",
        contract.THREADS: str(w.threads),
    })
    env.update(ctx.metrics_env)
    argv = tuple(placeholders.expand(arg, values) for arg in cfg.worker_argv)
    url = placeholders.expand(cfg.ready.url, values) if cfg.ready.url is not None else None
    return Launch(argv, env, fds, w.cwd, w.user, w.group, url)
