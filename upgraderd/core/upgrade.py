"""USR2: upgrade the master itself in place, keeping its pid, sockets and workers.

First a preflight: the master runs `upgraderd preflight -c CONFIG` with the
interpreter and package the exec would run (service/preflight.py imports
every module and loads the config), as a child with a deadline, without
blocking its loop. Only if it exits 0 does the master build a `Handover`
(core/handover.py) and exec the code now on disk through the `exec_master`
seam (system/reexec.py). The new master adopts everything and rolls a new
generation, as on SIGHUP. If the preflight or the exec fails, the old master
carries on as before and the upgrade counts as a failed reload.

Hazard: a signal that arrived after this pass read the wakeup socket is only
a byte on it, and the socket dies with the exec. So the pending signals are
passed to the exec, which raises them again while they are blocked: pending
signals survive exec, and the new master receives them once its handlers are
in place.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from upgraderd import __version__
from upgraderd.core import reloads
from upgraderd.core.generation import Generation
from upgraderd.core.handover import Handover, config_from_dict, config_to_dict
from upgraderd.core.seams import Exit
from upgraderd.core.stats import Stats
from upgraderd.errors import ConfigError, SpawnError

if TYPE_CHECKING:
    from upgraderd.core.master import Master

log = logging.getLogger("upgraderd")

# How long the new code may take to import everything and load the config.
PREFLIGHT_TIMEOUT = 30.0


@dataclass
class Upgrade:
    """A requested USR2 upgrade: pending, in preflight (a child pid and deadline), or cleared."""

    requested: bool = False
    pid: int | None = None
    deadline: float = 0.0
    passed: bool = False
    killed: bool = False

    def next_deadline(self) -> float | None:
        """Return when the running preflight times out, or None."""
        return self.deadline if self.pid is not None and not self.killed else None


def settle(master: Master, now: float) -> bool:
    """Advance a requested upgrade while no generation starts; return True if it acted."""
    up = master.upgrade
    if up.passed:
        up.passed = False
        reexec(master)
        return True
    if up.pid is not None and not up.killed and now >= up.deadline:
        log.error("master upgrade: the preflight (pid %d) did not finish within %gs; killing it",
                  up.pid, PREFLIGHT_TIMEOUT)
        master.system.procs.kill(up.pid, signal.SIGKILL)
        up.killed = True
    if not up.requested or up.pid is not None:
        return False
    up.requested = False
    try:
        master.system.load_config(master.config_path)
    except ConfigError as e:
        reloads.failed(master, f"master upgrade refused, the config is invalid: {e}", "rejected")
        return True
    argv = [*master.system.self_command, "preflight", "-c", master.config_path]
    try:
        up.pid = master.system.procs.spawn(argv, dict(master.system.environ), [])
    except SpawnError as e:
        _refused(master, f"cannot run the preflight: {e}")
        return True
    up.deadline, up.killed = now + PREFLIGHT_TIMEOUT, False
    log.info("master upgrade: preflight of the code on disk started (pid %d)", up.pid)
    return True


def on_exit(master: Master, ex: Exit) -> bool:
    """Take the exit of the preflight child; return False if `ex` is not it."""
    up = master.upgrade
    if ex.pid != up.pid:
        return False
    up.pid = None
    if ex.code == 0 and not up.killed:
        log.info("master upgrade: preflight passed")
        up.passed = True
    else:
        why = "timed out" if up.killed else ex.describe()
        _refused(master, f"the preflight of the new code failed ({why}); see its output above")
    return True


def _refused(master: Master, why: str) -> None:
    reloads.failed(master, f"master upgrade refused: {why}", "failed")


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
