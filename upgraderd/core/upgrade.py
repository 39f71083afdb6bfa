"""USR2: upgrade the master itself in place, keeping its pid, sockets and workers.

The old master builds a `Handover` (core/handover.py) and execs the code now
on disk through the `exec_master` seam (system/reexec.py). The new master
adopts everything and rolls a new generation, as on SIGHUP. If the exec
fails, the old master carries on as before.

Hazard: a signal that arrived after this pass read the wakeup socket is only
a byte on it, and the socket dies with the exec. So the pending signals are
passed to the exec, which raises them again while they are blocked: pending
signals survive exec, and the new master receives them once its handlers are
in place.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from upgraderd import __version__
from upgraderd.core import reloads
from upgraderd.core.generation import Generation
from upgraderd.core.handover import Handover, config_from_dict, config_to_dict
from upgraderd.core.stats import Stats
from upgraderd.errors import ConfigError

if TYPE_CHECKING:
    from upgraderd.core.master import Master

log = logging.getLogger("upgraderd")


def reexec(master: Master) -> None:
    """Exec the upgraderd now on disk in this process; on failure, carry on."""
    try:
        master.system.load_config(master.config_path)
    except ConfigError as e:
        reloads.failed(master, f"master upgrade refused, the config is invalid: {e}", "rejected")
        return
    record = Handover(
        listeners=master.system.listeners.export(), notify_fd=master.system.notify.fileno(),
        next_number=master.next_number, stats=master.stats.export(),
        started_at=master.started_at, wall_started_at=master.wall_started_at,
        generations=[{**g.export(), "config": config_to_dict(g.config)} for g in master.generations],
        metrics=master.metrics.export() if master.metrics is not None else None,
        fds=master.hooks.handover_fds(),
    )
    master.system.tell_systemd(f"RELOADING=1\nMONOTONIC_USEC={int(master.clock() * 1e6)}")
    for handler in logging.getLogger().handlers:
        handler.flush()
    err = master.system.exec_master(record, list(master.pending_signals()))
    log.error("master upgrade failed, carrying on as before: cannot exec %s: %s", " ".join(master.argv), err)
    master.stats.reloads["failed"] += 1
    master.system.tell_systemd("READY=1\nSTATUS=master upgrade failed")


def adopt(master: Master, record: Handover) -> None:
    """Take over the workers of the master we were exec'd from, then queue a reload."""
    master.stats = Stats.restore(record.stats)
    master.reloads.stats = master.judge.stats = master.stats
    master.next_number = int(record.next_number)
    master.started_at, master.wall_started_at = record.started_at, record.wall_started_at
    for data in record.generations:
        cfg = config_from_dict(data["config"])
        master.generations.append(Generation.adopt(data, cfg, master.spawner, master.new_readiness(cfg)))
    active = master.active
    master.config = active.config if active else None
    pids = [p for g in master.generations for p in g.pids()]
    log.info("upgraderd %s: upgraded the master in place (same pid); adopted %d workers of generations %s; "
             "rolling a new generation", __version__, len(pids),
             ", ".join(str(g.number) for g in master.generations) or "none")
    master.reloads.hup(master.clock())
