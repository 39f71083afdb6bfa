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
import sys
from typing import Sequence

from upgraderd.config import schema
from upgraderd.contract.notify import notify
from upgraderd.core.handover import Handover
from upgraderd.core.loop import Loop
from upgraderd.core.seams import KernelState, ListenerAPI, OrphanAPI, SocketKey, System
from upgraderd.errors import FatalError
from upgraderd.system import activation, channeldir, conflict, fdstore, kernel, orphanfds, reexec, sockets, strangers
from upgraderd.system.inotify import FileWatcher
from upgraderd.system.orphanfds import OrphanSet
from upgraderd.system.notifysock import NotifyServer
from upgraderd.system.probe import Prober, reserve_port
from upgraderd.system.rescuer import Rescuer
from upgraderd.system.process import PosixProcessAPI, user_env
from upgraderd.system.signals import SignalInbox
from upgraderd.system.templatectl import PosixTemplates

log = logging.getLogger("upgraderd")


class PosixKernel:
    """The kernel settings, read from and written to /proc/sys."""

    def ensure_migrate_req(self, policy: str, worker_bind: list[str]) -> KernelState:
        """Apply `policy` to net.ipv4.tcp_migrate_req."""
        state = kernel.ensure_migrate_req(policy, worker_bind)
        return KernelState(state.value, tuple(state.info), tuple(state.warnings))

    def retire_risk(self) -> str | None:
        """Return a warning if closing a reuseport slot socket now can reset queued connections."""
        return kernel.retire_risk()


def tell_systemd(message: str) -> None:
    """Tell systemd (if it started us with NOTIFY_SOCKET) about our state."""
    try:
        notify(message)
    except OSError as e:
        log.debug("sd_notify failed: %s", e)


def posix_system(handover: Handover | None, argv: Sequence[str],
                 adopted: dict[SocketKey, tuple[socket.socket, str]] | None = None,
                 cfg: schema.Config | None = None) -> System:
    """Return the real OS services; adopt the notify socket a USR2 predecessor handed over,
    and the listening sockets passed to this master or taken from orphans (`adopted`, for `cfg`)."""
    notify_server = None
    if handover is not None:
        os.set_inheritable(handover.notify_fd, False)  # it was inheritable only for the exec
        notify_server = NotifyServer(socket.socket(fileno=handover.notify_fd))

    def exec_master(record: Handover, pending: Sequence[int]) -> OSError:
        return reexec.exec_master(record.to_json(), record.inherited_fds(), argv, pending)

    procs = PosixProcessAPI()
    listeners = strangers.CheckedListeners()
    if adopted and cfg is not None:
        # A dead master's socket file is ours to remove at a clean stop; a passed one is not.
        own = {k for k, (_, origin) in adopted.items() if not origin.startswith(activation.PASSED)}
        listeners.adopt_listening(cfg, {k: s for k, (s, _) in adopted.items()}, own)
    return System(
        procs=procs, templates=PosixTemplates(procs), notify=notify_server or NotifyServer(),
        listeners=listeners,
        probes=Prober(), kernel=PosixKernel(), environ=os.environ, load_config=_load_and_warn,
        user_env=user_env, reserve_port=reserve_port, self_command=(sys.executable, "-m", "upgraderd"),
        tell_systemd=tell_systemd, exec_master=exec_master, watcher=FileWatcher(),
        rescue=Rescuer(listeners.fileno_of), check_probes=Prober(interval=0.05), strangers=listeners.strangers)


def _load_and_warn(path: str) -> schema.Config:
    """Load the config at `path` for a reload; log each key it sets that changes nothing."""
    cfg = schema.load(path)
    for warning in cfg.warnings:
        log.warning("%s", warning)
    return cfg


def inherited_handover() -> Handover | None:
    """Return the hand-over of the master we were exec'd from (USR2), or None."""
    raw = reexec.inherited()
    return Handover.from_json(raw) if raw is not None else None


def fds_to_keep(system: System, orphans: OrphanAPI | None) -> list[int]:
    """Return every fd the master must keep across daemonizing."""
    pidfds = orphans.pidfds() if orphans is not None else []
    return [*system.listeners.filenos(), *system.watched_fds(), *pidfds]


def outlive(cfg: schema.Config, status_path: str
            ) -> tuple[dict[SocketKey, tuple[socket.socket, str]], OrphanSet]:
    """Refuse to start next to another master; collect the listening sockets that outlived the last one.

    In this order: passed to us (socket activation, the fd store), then taken
    from a dead master's orphaned workers. Raise FatalError naming another
    live master that serves one of `cfg`'s addresses.
    """
    rival = conflict.find_conflict(cfg)
    if rival is not None:
        raise FatalError(rival.message())
    adopted = activation.Adopted()
    try:
        activation.match(cfg, activation.take_passed(), adopted)
        found = orphanfds.find(status_path, cfg, adopted)
    except BaseException:
        adopted.close()
        raise
    return dict(adopted.sockets), found


def _store(config: schema.Config | None, listeners: ListenerAPI, store: fdstore.FdStore | None) -> None:
    """Keep the service manager's fd store in step with the master's sockets."""
    if store is None or config is None:
        return
    try:
        store.sync(fdstore.names(config, listeners.keys()), listeners.fileno_of)
    except Exception:
        log.exception("internal error while storing sockets with the service manager; carrying on")


def _watch_writes(sel: selectors.BaseSelector, system: System, before: list[int]) -> list[int]:
    """Select the template channels that have requests queued for writability, and only those.

    Re-registered each pass, not diffed: a channel closed since may have left its
    number to a new one, which the kernel's epoll set does not hold.
    """
    for fd in before:
        sel.unregister(fd)   # the selector ignores the kernel's error for a closed fd
    now = system.templates.writers() if system.templates is not None else []
    for fd in now:
        sel.register(fd, selectors.EVENT_WRITE)
    return now


def run(master: Loop, system: System, inbox: SignalInbox) -> int:
    """Serve until the master has no generation left; return its exit code.

    The loop blocks only in `select`, on the signal wakeup socket of `inbox`
    (the one whose `drain` the master was built with) and the master's own fds
    (notify socket, probe epoll, inotify), at most until the master's next
    deadline. The master releases what it started (`close`); the loop then
    closes the system's sockets.
    """
    store = fdstore.FdStore.from_env(os.environ)
    # After daemonizing (the directory is named for the pid that keeps it across USR2),
    # before the first worker: the workers inherit its path from our environment.
    channels = channeldir.prepare(os.environ)
    try:
        with inbox, selectors.DefaultSelector() as sel:
            for fd in (inbox.fileno(), *system.watched_fds()):
                sel.register(fd, selectors.EVENT_READ)
            master.start()
            master.step(set())
            _store(master.config, system.listeners, store)
            writing = _watch_writes(sel, system, [])
            while master.running:
                sel.select(master.timeout())
                master.step(inbox.drain())
                _store(master.config, system.listeners, store)
                writing = _watch_writes(sel, system, writing)
    finally:
        master.close()
    system.close()
    channeldir.remove(channels)
    log.info("upgraderd stopped")
    return master.exit_code
