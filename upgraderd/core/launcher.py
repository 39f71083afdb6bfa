"""Describe one worker's start: argv, environment, fds and readiness URL, from one place.

Design note: a worker's environment used to be assembled from six sources in
four modules, and the fd numbers in `{fd:NAME}` agreed with the fds actually
passed only by convention. Here one function builds a `Launch` from the
config, the generation and the slot. The fd order comes from
`Config.fd_listeners`, which `{fd:NAME}` uses too, so the two cannot
disagree. Nothing here touches the OS: the sockets' fd numbers come from the
`ListenerAPI` seam and the environment of the master is passed in.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from upgraderd.config import placeholders
from upgraderd.config.schema import Config
from upgraderd.contract import env as contract
from upgraderd.core.generation import Generation, GenerationState, WorkerState
from upgraderd.core.prefork import Prefork
from upgraderd.core.readiness import Readiness
from upgraderd.errors import SpawnError

if TYPE_CHECKING:
    from upgraderd.core.master import Master

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
    """What a launch needs from the master besides the config."""

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


class Spawner:
    """The `Launcher` generations start and signal their workers through."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self.prefork = Prefork(master.system.templates, master.system.procs, master.stats,
                               lambda: master.next_number)

    def spawn_worker(self, gen: Generation, slot: int) -> int | None:
        """Start worker `slot` of `gen` with its sockets; return the pid (None: a template
        forks it, see core/prefork.py) or raise SpawnError."""
        m, sys_ = self.master, self.master.system
        ctx = Context(sys_.environ, sys_.notify.address, sys_.user_env(gen.config.workers.user),
                      m.metrics.worker_env(gen.config) if m.metrics else {})
        try:
            spec = describe(gen.config, gen.number, slot, sys_.listeners.child_fds(gen.config, slot, gen.number),
                            gen.ready_rule, ctx)
        except (OSError, ValueError) as e:
            raise SpawnError(f"cannot prepare the worker: {getattr(e, 'strerror', None) or e}") from None
        respawn = gen.state is GenerationState.ACTIVE and gen.workers[slot].state is WorkerState.BACKOFF
        if gen.config.prefork:
            self.prefork.request(gen, slot, spec)
            m.stats.worker_restarts += respawn
            return None
        pid = sys_.procs.spawn(spec.argv, spec.env, spec.fds, cwd=spec.cwd, user=spec.user, group=spec.group)
        if respawn:
            m.stats.worker_restarts += 1
        gen.ready_rule.started(pid, spec.ready_url, m.clock())
        return pid

    def signal_worker(self, pid: int, sig: int) -> None:
        """Send `sig` to worker `pid`; a SIGKILL outside a fast stop is a drain timeout."""
        if sig == signal.SIGKILL and self.master.stopping_mode != "fast":
            self.master.stats.drain_timeouts += 1
        self.master.system.procs.kill(pid, sig)
