"""Assemble the real OS services the master runs on, and its loop.

This is the one place where the core's seams (core/seams.py) meet their
implementations: posix_spawn and waitpid, the master's sockets, the notify
socket, the readiness probes, /proc/sys, sd_notify and exec.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
from typing import Any, Sequence

from upgraderd.config import schema
from upgraderd.core.handover import Handover
from upgraderd.core.master import Master
from upgraderd.core.seams import KernelState, System
from upgraderd.system import kernel, reexec, sockets
from upgraderd.system.notify import NotifyServer, notify
from upgraderd.system.probe import Prober, reserve_port
from upgraderd.system.process import PosixProcessAPI, user_env
from upgraderd.system.signals import SignalInbox
from upgraderd.system.template import PosixTemplates

log = logging.getLogger("upgraderd")


class PosixKernel:
    """The kernel settings, read from and written to /proc/sys."""

    def ensure_migrate_req(self, policy: str, worker_bind: list[str]) -> KernelState:
        """Apply `policy` to net.ipv4.tcp_migrate_req."""
        state = kernel.ensure_migrate_req(policy, worker_bind)
        return KernelState(state.value, tuple(state.info), tuple(state.warnings))

    def retire_risk(self) -> str | None:
        """Return a warning if closing a reuseport slot socket now can reset queued connections."""
        return sockets.retire_risk()


def tell_systemd(message: str) -> None:
    """Tell systemd (if it started us with NOTIFY_SOCKET) about our state."""
    try:
        notify(message)
    except OSError as e:
        log.debug("sd_notify failed: %s", e)


def posix_system(handover: Handover | None, argv: Sequence[str]) -> System:
    """Return the real OS services; adopt the notify socket a USR2 predecessor handed over."""
    notify_server = None
    if handover is not None:
        os.set_inheritable(handover.notify_fd, False)  # it was inheritable only for the exec
        notify_server = NotifyServer(socket.socket(fileno=handover.notify_fd))

    def exec_master(record: Any, pending: Sequence[int]) -> OSError:
        return reexec.exec_master(record.to_json(), record.inherited_fds(), argv, pending)

    procs = PosixProcessAPI()
    return System(
        procs=procs, templates=PosixTemplates(procs), notify=notify_server or NotifyServer(), listeners=sockets.ListenerSet(),
        probes=Prober(), kernel=PosixKernel(), environ=os.environ, load_config=schema.load,
        user_env=user_env, reserve_port=reserve_port, tell_systemd=tell_systemd, exec_master=exec_master)


def inherited_handover() -> Handover | None:
    """Return the hand-over of the master we were exec'd from (USR2), or None."""
    raw = reexec.inherited()
    return Handover.from_json(raw) if raw is not None else None


def fds_to_keep(master: Master) -> list[int]:
    """Return every fd the master must keep across daemonizing."""
    return [*master.system.listeners.filenos(), *master.system.watched_fds()]


def run(master: Master) -> int:
    """Serve until the master has no generation left; return its exit code.

    The loop blocks only in `select`, on the signal wakeup socket and the
    master's own fds (notify socket, probe epoll), at most until the master's
    next deadline.
    """
    try:
        with SignalInbox() as inbox, selectors.DefaultSelector() as sel:
            master.pending_signals = inbox.drain
            for fd in (inbox.fileno(), *master.system.watched_fds()):
                sel.register(fd, selectors.EVENT_READ)
            master.start()
            master.step(set())
            while master.generations:
                sel.select(master.timeout(master.clock()))
                master.step(inbox.drain())
    finally:
        if master.metrics is not None:
            master.metrics.close()
            master.metrics = None
    master.system.close()
    log.info("upgraderd stopped")
    return master.exit_code
