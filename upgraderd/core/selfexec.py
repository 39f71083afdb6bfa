"""USR2: re-exec the master itself in place, keeping its pid, sockets and workers.

First a preflight: the master runs `upgraderd preflight -c CONFIG` with the
interpreter and package the exec would run (service/preflight.py imports
every module and loads the config), as a child with a deadline, without
blocking its loop. Only if it exits 0 does the master build a `Handover`
(core/handover.py) and exec the code now on disk through the `exec_master`
seam (system/reexec.py). The new master adopts everything (core/master.py
`Master.start`) and rolls a new generation, as on SIGHUP. If the preflight or
the exec fails, the old master carries on as before and the re-exec counts as
a failed reload.

`SelfExec` is the only writer of the re-exec's state; the hand-over record is
gathered by the master from every owner (`Master._record`, passed to `settle`).

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
from typing import Callable, Iterable, Mapping, Sequence

from upgraderd.config.schema import Config
from upgraderd.core import events as ev
from upgraderd.core.handover import Handover
from upgraderd.core.reloads import Reloads
from upgraderd.core.seams import Exit, ProcessAPI
from upgraderd.errors import ConfigError, SpawnError

log = logging.getLogger("upgraderd")

# How long the new code may take to import everything and load the config.
PREFLIGHT_TIMEOUT = 30.0


@dataclass(frozen=True)
class SelfExecSeams:
    """What a re-exec needs of the OS and of the process around the master."""

    config_path: str
    load_config: Callable[[str], Config]
    procs: ProcessAPI
    self_command: Sequence[str]           # [python, -m, upgraderd]
    environ: Mapping[str, str]
    # Exec the master again with the hand-over and the pending signals; returns only if the exec failed.
    exec_master: Callable[[Handover, Sequence[int]], OSError]
    tell_systemd: Callable[[str], None]
    argv: Sequence[str]                   # what the exec runs, for the log
    pending_signals: Callable[[], Iterable[int]] = lambda: ()


class SelfExec:
    """A requested USR2 re-exec: pending, in preflight (a child pid and deadline), or cleared."""

    def __init__(self, seams: SelfExecSeams, reloads: Reloads, bus: ev.Bus, clock: Callable[[], float]) -> None:
        self.seams, self.reloads, self.bus, self.clock = seams, reloads, bus, clock
        self.requested = False
        self.pid: int | None = None
        self.deadline = 0.0
        self.passed = False
        self.killed = False

    def request(self) -> None:
        """Take a SIGUSR2: preflight, then re-exec, once no generation starts; refuse it during a rollout."""
        canary = self.reloads.fleet.held
        if canary is not None:
            # The hand-over carries generations, not a canary's window and checks: the new
            # master would promote it unjudged, or drop it.
            log.warning("received SIGUSR2: refused, the rollout of generation %d has no verdict yet; "
                        "send USR2 again once it is promoted or rolled back", canary.number)
            return
        log.info("received SIGUSR2: upgrading the master in place")
        self.requested = True

    def next_deadline(self) -> float | None:
        """Return when the running preflight times out, or None."""
        return self.deadline if self.pid is not None and not self.killed else None

    def settle(self, now: float, record: Callable[[], Handover]) -> None:
        """Advance a requested re-exec (call it while no generation starts); `record` gathers the hand-over."""
        if self.passed:
            self.passed = False
            self.reexec(record)
            return
        if self.pid is not None and not self.killed and now >= self.deadline:
            log.error("master upgrade: the preflight (pid %d) did not finish within %gs; killing it",
                      self.pid, PREFLIGHT_TIMEOUT)
            self.seams.procs.kill(self.pid, signal.SIGKILL)
            self.killed = True
        if not self.requested or self.pid is not None:
            return
        self.requested = False
        s = self.seams
        if not self._config_valid():
            return
        argv = [*s.self_command, "preflight", "-c", s.config_path]
        try:
            self.pid = s.procs.spawn(argv, dict(s.environ), [])
        except SpawnError as e:
            self._refused(f"cannot run the preflight: {e}")
            return
        self.deadline, self.killed = now + PREFLIGHT_TIMEOUT, False
        log.info("master upgrade: preflight of the code on disk started (pid %d)", self.pid)

    def claim(self, exits: Iterable[Exit]) -> list[Exit]:
        """Take the exit of the preflight child; return the other exits."""
        rest = []
        for ex in exits:
            if ex.pid != self.pid:
                rest.append(ex)
                continue
            self.pid = None
            if ex.code == 0 and not self.killed:
                log.info("master upgrade: preflight passed")
                self.passed = True
            else:
                why = "timed out" if self.killed else ex.describe()
                self._refused(f"the preflight of the new code failed ({why}); see its output above")
        return rest

    def _refused(self, why: str) -> None:
        self.reloads.reject(f"master upgrade refused: {why}", "failed")

    def _config_valid(self) -> bool:
        """Check the config file now (before the preflight, and again before the exec: it may
        have changed in between); a bad one refuses the re-exec as rejected."""
        try:
            self.seams.load_config(self.seams.config_path)
        except ConfigError as e:
            self.reloads.reject(f"master upgrade refused, the config is invalid: {e}", "rejected")
            return False
        return True

    def reexec(self, record: Callable[[], Handover]) -> None:
        """Exec the upgraderd now on disk in this process; on failure, carry on."""
        s = self.seams
        if not self._config_valid():
            return
        handover = record()
        s.tell_systemd(f"RELOADING=1\nMONOTONIC_USEC={int(self.clock() * 1e6)}")
        for handler in logging.getLogger().handlers:
            handler.flush()
        err = s.exec_master(handover, list(s.pending_signals()))
        self.bus.emit(ev.ReexecFailed(str(err), " ".join(s.argv)))
        s.tell_systemd("READY=1\nSTATUS=master upgrade failed")
