"""The master's side of prefork templates: exec one, ask it for workers, stop it.

A template is started like a worker (posix_spawn through the same shim and
privilege drop, so it runs as `workers.user` in `workers.cwd`) with one end of
a SOCK_SEQPACKET socketpair at fd 3, its control channel. Each request is
one packet: a JSON object (slot, environment) with the worker's listening
sockets attached by SCM_RIGHTS; the template keeps no socket after the fork,
so a slot the master closes is never held open by a template. The other side
is apps/template.py, which answers with SPAWNED=<slot>:<pid> on the notify
socket (core/prefork.py judges it).

The master becomes a child subreaper (prctl PR_SET_CHILD_SUBREAPER) before
its first template: the template double-forks each worker, so the worker is
re-parented to the master, which then waits for it as for any worker. The
setting survives a USR2 re-exec.

Flow control: sends never block. A request the channel cannot take now (the
template is still importing, or forking an earlier batch) waits in the
template's queue, in order, with duplicates of its fds (the master may close a
slot's socket meanwhile, and its number could then name another socket).
`flush()` sends what the channels take; the loop selects the channels with a
queue for writability (`writers()`), so it wakes as soon as a template has
read. Whether a template that takes nothing has stalled is core/prefork.py's
decision, with its clock; a full buffer is not an error here.

Hazard: the control channel's fd is close-on-exec, so a USR2 re-exec of the
master closes it; the templates see EOF and exit. Generations the new master
adopts keep their workers, but cannot respawn a slot until the next HUP.
"""

from __future__ import annotations

import array
import ctypes
import json
import logging
import os
import signal
import socket
from collections import deque
from typing import Mapping, Sequence

from upgraderd.contract import env as contract
from upgraderd.errors import SpawnError
from upgraderd.system.process import PosixProcessAPI

log = logging.getLogger("upgraderd")

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants children of this process; return False if the kernel refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.error("prctl(PR_SET_CHILD_SUBREAPER) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


class PosixTemplates:
    """Templates as child processes, each with a control socket."""

    def __init__(self, procs: PosixProcessAPI) -> None:
        self.procs = procs
        self.channels: dict[int, socket.socket] = {}
        # Requests a channel could not take yet: (payload, fds this object owns), in order.
        self.queues: dict[int, deque[tuple[bytes, list[int]]]] = {}
        self.subreaper = False

    def start(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None,
              user: str | None = None, group: str | None = None) -> int:
        """Exec a template with its control channel at fd 3; return its pid or raise SpawnError."""
        if not self.subreaper:
            self.subreaper = become_subreaper()
            if not self.subreaper:
                raise SpawnError("cannot become a child subreaper, so forked workers could not be reaped")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            env = {**env, contract.TEMPLATE_PARENT: str(os.getpid())}
            pid = self.procs.spawn(argv, env, [theirs.fileno()], cwd=cwd, user=user, group=group)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.channels[pid] = ours
        return pid

    def fork(self, pid: int, slot: int, env: Mapping[str, str], fds: Sequence[int]) -> None:
        """Ask template `pid` for a worker in `slot`; raise SpawnError if it cannot take the request."""
        self._send(pid, {"slot": slot, "env": dict(env)}, fds)

    def _send(self, pid: int, request: dict[str, object], fds: Sequence[int]) -> None:
        channel = self.channels.get(pid)
        if channel is None:
            raise SpawnError(f"template pid {pid} is gone")
        payload = json.dumps(request).encode()
        queue = self.queues.get(pid)
        if not queue:
            try:
                if self._try(channel, payload, fds):
                    return
            except OSError as e:
                raise SpawnError(f"cannot reach template pid {pid}: {e.strerror or e}") from None
        try:
            owned = [os.dup(fd) for fd in fds]   # close-on-exec, as os.dup makes them
        except OSError as e:
            raise SpawnError(f"cannot queue a request for template pid {pid}: {e.strerror or e}") from None
        self.queues.setdefault(pid, deque()).append((payload, owned))

    @staticmethod
    def _try(channel: socket.socket, payload: bytes, fds: Sequence[int]) -> bool:
        """Send one request; return False if the channel is full (raise OSError if it is broken)."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            channel.sendmsg([payload], anc)
        except BlockingIOError:
            return False
        return True

    def flush(self) -> dict[int, int]:
        """Send queued requests the channels take now; return, for each template that still
        has a queue, how many it took in this call."""
        left: dict[int, int] = {}
        for pid, queue in list(self.queues.items()):
            taken = 0
            try:
                while queue and self._try(self.channels[pid], *queue[0]):
                    _closeall(queue.popleft()[1])
                    taken += 1
            except OSError as e:   # the template died: its exit fails what waited for it
                log.warning("template pid %d: channel broken (%s); %d requests dropped",
                            pid, e.strerror or e, len(queue))
                self._drop(pid)
                continue
            if queue:
                left[pid] = taken
            else:
                del self.queues[pid]
        return left

    def writers(self) -> list[int]:
        """Return the channels' fds that have requests waiting (select them for writability)."""
        return [self.channels[pid].fileno() for pid in self.queues]

    def _drop(self, pid: int) -> None:
        for _payload, fds in self.queues.pop(pid, ()):
            _closeall(fds)

    def load(self, pid: int, app: str, env: Mapping[str, str]) -> None:
        """Make standby `pid` import `app` with `env` and become a template; raise SpawnError."""
        self._send(pid, {"load": app, "env": dict(env)}, ())

    def stop(self, pid: int) -> None:
        """Close template `pid`'s channel and SIGKILL it; workers it forked live on."""
        self._drop(pid)
        channel = self.channels.pop(pid, None)
        if channel is not None:
            channel.close()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def is_child(self, pid: int) -> bool:
        """Return True if `pid` is a live (or unreaped) child of this process."""
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return False
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        return len(fields) > 1 and fields[1] == str(os.getpid()).encode()

    def close_all(self) -> None:
        """Stop every template (only at exit)."""
        for pid in list(self.channels):
            self.stop(pid)



def _closeall(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
