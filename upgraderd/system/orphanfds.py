"""Take over the listening sockets of a dead master's orphaned workers.

A master that is SIGKILLed leaves its workers behind; they keep accepting for
`drain.orphan_grace` (worker/outlive.py). A master restarted with the same
pidfile finds them, duplicates their listening sockets into itself with
`pidfd_getfd(2)`, and adopts those instead of binding: the kernel's accept
queues carry over, and nothing is refused while the masters change. Once its
first generation is ACTIVE it sends the orphans their drain signal
(core/takeover.py). They are not its children: it tracks them by pidfd.

Trust: the dead master's status file (`PIDFILE.status.json`) only *suggests*
pids; a local user may have written it. It is opened without following a
symlink, must be a regular file of our uid (or root's), at most 1 MiB, and
well-formed. Each suggested pid is pinned with `pidfd_open` first, then
checked through /proc: alive, its parent is neither the dead master's pid nor
a live master (it was reparented to init or a subreaper), its uid is ours or
the configured workers' user's, and its environment has our UPGRADERD_*
variables. Only then is the pidfd checked again (the checks were about that
very process) and used. A pid that fails anything is left alone and never
signalled.

Forked workers (prefork, the default with `warm`) show their template's
environment in /proc/PID/environ: UPGRADERD_GENERATION, but no LISTEN_FDS
and the slot of whichever worker started the template. So the slot is the
dead master's own record of that pid (the status file's `slot`), and the
sockets are found where every worker has them: a forked worker's listening
sockets sit at fds 3, 4, ... (apps/template.py `_place`), and each is
matched to a listener by its address, as a passed socket is checked
(activation.check). The first fd that is not such a socket ends the list.
An exec'd worker's LISTEN_FDS and LISTEN_FDNAMES are used as before.

Permissions: `pidfd_getfd` needs PTRACE_MODE_ATTACH on the orphan: root, or
the same uid with kernel.yama.ptrace_scope 0 (and no dumpable restriction).
Without it the orphans are still drained at once, and the master binds anew:
then the queued connections of a reuseport slot may be reset when its
orphan closes it (unless net.ipv4.tcp_migrate_req=1).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import select
import signal
import socket
import stat
from dataclasses import dataclass, field

from upgraderd.config.schema import Config, ListenerSpec
from upgraderd.config.validators import worker_ids
from upgraderd.contract import env as contract
from upgraderd.system import procfs
from upgraderd.system.activation import Adopted, check, key_of, parse_name
from upgraderd.errors import FatalError

log = logging.getLogger("upgraderd")

SYS_PIDFD_GETFD = 438
MAX_STATUS = 1 << 20
MAX_PIDS = 4096
MAX_LISTEN_FDS = 64


@dataclass
class Orphan:
    """One orphaned worker, pinned by its pidfd."""

    pid: int
    pidfd: int
    slot: int
    names: list[str] | None  # None: a forked worker, its sockets matched by address
    listen_fds: int
    drain_signal: int
    exited: bool = False


def read_status(path: str) -> dict[str, object] | None:
    """Return the dead master's status document if it is safe to read, else None (logged)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno not in (errno.ENOENT,):
            log.warning("orphans: not reading %s: %s", path, e.strerror)
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_size > MAX_STATUS:
            log.warning("orphans: not reading %s: not a regular file of uid %d under 1 MiB",
                        path, os.geteuid())
            return None
        doc = json.loads(os.read(fd, MAX_STATUS + 1).decode("utf-8"))
    except (OSError, ValueError) as e:
        log.warning("orphans: not reading %s: %s", path, e)
        return None
    finally:
        os.close(fd)
    return doc if isinstance(doc, dict) else None


def suggested_pids(doc: dict[str, object]) -> tuple[int, dict[int, int | None]]:
    """Return (the dead master's pid, {worker pid: its slot or None}) from a status document;
    (0, {}) if malformed."""
    master, gens = doc.get("pid"), doc.get("generations")
    if not procfs.valid_pid(master) or not isinstance(gens, list):
        return 0, {}
    pids: dict[int, int | None] = {}
    for g in gens[:MAX_PIDS]:
        workers = g.get("workers") if isinstance(g, dict) else None
        for w in workers if isinstance(workers, list) else []:
            pid = w.get("pid") if isinstance(w, dict) else None
            if isinstance(pid, int) and procfs.valid_pid(pid) and pid not in pids and len(pids) < MAX_PIDS:
                slot = w.get("slot")
                pids[pid] = slot if isinstance(slot, int) and 0 <= slot < MAX_PIDS else None
    return (master if isinstance(master, int) else 0), pids


def _signal_of(name: str) -> int:
    name = name.upper()
    try:
        return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        return int(signal.SIGTERM)


def _checked(pid: int, slot: int | None, dead_master: int, uids: set[int]) -> Orphan | None:
    """Pin `pid` and return it as an Orphan if every check passes, else None.

    `slot` is the dead master's record of the pid's slot (None: not recorded).
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    why = _why_not(pid, dead_master, uids)
    env = procfs.environ(pid) if why is None else None
    if why is None and env is not None:
        orphan = _orphan(pid, pidfd, slot, env)
        try:
            if orphan is None:
                why = "its slot is neither in the status file nor in its environment"
            else:
                signal.pidfd_send_signal(pidfd, 0)  # still the process we just looked at
                return orphan
        except OSError:
            why = "exited while being checked"
    log.info("orphans: pid %d is not taken over: %s", pid, why or "its environment is unreadable")
    os.close(pidfd)
    return None


def _orphan(pid: int, pidfd: int, slot: int | None, env: dict[str, str]) -> Orphan | None:
    """Return the Orphan for a checked pid: an exec'd worker's layout from its environment,
    a forked one's (no LISTEN_FDS there) found at its fds by address."""
    drain = _signal_of(env.get(contract.DRAIN_SIGNAL, "TERM"))
    listen = procfs.small_int(env.get(contract.LISTEN_FDS, ""))
    if listen is not None:
        return Orphan(pid, pidfd, int(env[contract.SLOT]) if slot is None else slot,
                      env.get(contract.LISTEN_FDNAMES, "").split(":"), listen, drain)
    if slot is None:
        return None
    return Orphan(pid, pidfd, slot, None, MAX_LISTEN_FDS, drain)


def _why_not(pid: int, dead_master: int, uids: set[int]) -> str | None:
    facts = procfs.ppid_uid_state(pid)
    if facts is None or facts[2] in ("Z", "X"):
        return "not alive"
    ppid, uid, _ = facts
    if ppid == dead_master or (ppid not in (0, 1) and procfs.is_master(ppid)):
        return f"its parent {ppid} is alive: not an orphan"
    if uid not in uids:
        return f"uid {uid} is neither ours nor the workers' user's"
    env = procfs.environ(pid)
    if env is None:
        return "its environment is unreadable"
    # A forked worker has its template's environment: UPGRADERD_GENERATION, no LISTEN_FDS.
    if procfs.small_int(env.get(contract.GENERATION, "")) is None:
        return f"{contract.GENERATION} is missing from its environment or malformed: not an upgraderd worker"
    if contract.LISTEN_FDS in env:
        for var in (contract.SLOT, contract.LISTEN_FDS):
            if procfs.small_int(env.get(var, "")) is None:
                return f"{var} is missing from its environment or malformed: not an upgraderd worker"
        if int(env[contract.LISTEN_FDS]) > MAX_LISTEN_FDS:
            return "LISTEN_FDS is out of range"
    return None


_libc = ctypes.CDLL(None, use_errno=True)


def pidfd_getfd(pidfd: int, target: int) -> int:
    """Return a duplicate, in this process, of fd `target` of the process behind `pidfd`."""
    fd = int(_libc.syscall(SYS_PIDFD_GETFD, pidfd, target, 0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd  # the kernel sets O_CLOEXEC on it


def _fetch(o: Orphan, cfg: Config) -> list[tuple[str, socket.socket, str]]:
    """Return (name, socket, origin) of every listening socket `o` was started with.

    A forked worker's (no names) end at the first fd that is not a socket
    some listener of `cfg` is bound like: that is an fd the app opened itself.
    """
    out = []
    for i in range(o.listen_fds):
        target = 3 + i
        try:
            fd = pidfd_getfd(o.pidfd, target)
        except OSError as e:
            if o.names is None and e.errno == errno.EBADF:
                break
            log.info("orphans: cannot take fd %d of pid %d: %s", target, o.pid, e.strerror)
            if e.errno == errno.EPERM:
                break
            continue
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            os.close(fd)
            if o.names is None:
                break
            continue
        sock, origin = socket.socket(fileno=fd), f"fd {target} of orphan pid {o.pid}"
        name = o.names[i] if o.names is not None and i < len(o.names) else _listener_of(sock, cfg, origin)
        if name is None:
            sock.close()
            break
        out.append((name, sock, origin))
    return out


def _listener_of(sock: socket.socket, cfg: Config, origin: str) -> str | None:
    """Return the name of the listener of `cfg` that `sock` is bound like, or None."""
    for spec in cfg.listeners:
        try:
            check(sock, spec, origin)
        except (FatalError, OSError):
            continue
        return spec.name
    return None


@dataclass
class OrphanSet:
    """The orphans this master found, tracked by pidfd (core/seams.py OrphanAPI)."""

    orphans: list[Orphan] = field(default_factory=list)

    def live(self) -> int:
        """Return how many orphans have not exited yet (a pidfd turns readable at exit)."""
        for o in self.orphans:
            if o.exited:
                continue
            try:
                o.exited = bool(select.select([o.pidfd], [], [], 0)[0])
            except (OSError, ValueError) as e:
                self._lost(o, e)
        return sum(not o.exited for o in self.orphans)

    def _lost(self, o: Orphan, e: BaseException) -> None:
        """Stop tracking `o`: its pidfd is unusable, and a bare pid could be reused."""
        log.warning("orphans: lost track of pid %d (%s); it drains by itself at its grace period", o.pid, e)
        o.exited = True

    def pids(self) -> list[int]:
        """Return the pids of the orphans still alive."""
        self.live()
        return [o.pid for o in self.orphans if not o.exited]

    def drain(self) -> None:
        """Send each live orphan the drain signal it was started with."""
        self._send(None)

    def kill(self) -> None:
        """SIGKILL every live orphan."""
        self._send(int(signal.SIGKILL))

    def _send(self, sig: int | None) -> None:
        for o in self.orphans:
            if not o.exited:
                try:
                    signal.pidfd_send_signal(o.pidfd, o.drain_signal if sig is None else sig)
                except ProcessLookupError:
                    o.exited = True
                except OSError as e:
                    self._lost(o, e)

    def pidfds(self) -> list[int]:
        """Return the pidfds (to keep them open across daemonizing)."""
        return [o.pidfd for o in self.orphans]

    def close(self) -> None:
        """Release the pidfds."""
        for o in self.orphans:
            try:
                os.close(o.pidfd)
            except OSError:
                pass  # already closed (a daemonizing that did not keep it)
        self.orphans.clear()


def find(status_path: str, cfg: Config, adopted: Adopted) -> OrphanSet:
    """Find a dead master's orphans; adopt into `adopted` the sockets `cfg` wants."""
    doc = read_status(status_path)
    found = OrphanSet()
    if doc is None:
        return found
    dead, slots = suggested_pids(doc)
    if dead == os.getpid():
        return found  # our own status file (a USR2 re-exec never gets here)
    uids = {os.getuid()}
    try:
        uids.add(worker_ids(cfg.workers.user, cfg.workers.group)[0])
    except (ValueError, KeyError, OSError):
        pass
    for pid, slot in slots.items():
        o = _checked(pid, slot, dead, uids)
        if o is not None:
            found.orphans.append(o)
    for o in found.orphans:
        _adopt(o, cfg, adopted)
    if found.orphans:
        log.info("took over %d orphaned worker(s) of dead master pid %d: %s", len(found.orphans), dead,
                 " ".join(str(o.pid) for o in found.orphans))
    return found


def _adopt(o: Orphan, cfg: Config, adopted: Adopted) -> None:
    by_name: dict[str, ListenerSpec] = {s.name: s for s in cfg.listeners}
    for name, sock, origin in _fetch(o, cfg):
        spec = by_name.get(parse_name(name)[0])
        key = key_of(spec, o.slot if spec.mode == "reuseport" else 0, cfg) if spec else None
        if spec is None or key is None:
            sock.close()
            continue
        try:
            check(sock, spec, origin)
        except FatalError as e:
            log.warning("orphans: %s; not adopted", e)
            sock.close()
            continue
        inode = os.fstat(sock.fileno()).st_ino
        have = adopted.sockets.get(key)
        if have is not None:
            if os.fstat(have[0].fileno()).st_ino != inode:
                log.warning("orphans: %s is another socket than the one slot %d of %r already has; "
                            "not adopted", origin, key[3], spec.name)
            sock.close()
            continue
        if any(os.fstat(s.fileno()).st_ino == inode for s, _ in adopted.sockets.values()):
            log.warning("orphans: %s already serves another slot (the mode changed?); not adopted", origin)
            sock.close()
            continue
        adopted.sockets[key] = (sock, origin)
        log.info("adopted %s for listener %r slot %d (%s)", origin, spec.name, key[3], spec.address)
