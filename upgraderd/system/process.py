"""The OS seam for worker processes: spawn, signal, reap.

This is the only module that creates, signals or waits on processes; unit
tests replace `PosixProcessAPI` with a fake that records calls and scripts
exits.

Design note: workers are started with `posix_spawn`, never a bare `fork()` of
the master (the master may run a metrics thread, and only exec loads new code
from disk). systemd's protocol wants `LISTEN_PID` to equal the worker's own
pid, which is unknown before the spawn, so argv goes through a one-line shell
shim that exports `$$` and execs the real program; the pid does not change
across exec.

Privilege drop: posix_spawn cannot change the user, so a worker that runs as
`workers.user`/`group` is started through util-linux's `setpriv`, which sets
the real and effective ids and the supplementary groups, then execs the
shim (same pid again). The master itself stays root, so it can still bind
low ports on a reload.

Process groups: every process spawned here (worker, template, standby) leads
a process group of its own (posix_spawn's setpgroup, i.e. setpgid(0, 0)
before the exec), and a template's forked workers stay in the template's.
A shell's job control (`kill -HUP %1`), a terminal's Ctrl-C or Ctrl-Z and a
session leader's hang-up signal the master's group only: the master decides
what a signal means for its workers, and gunicorn-like `command:` workers
never take a terminal's SIGHUP as their own reload. So nothing may signal a
group: the master stops each worker by its pid.
"""

from __future__ import annotations

import errno
import os
import pwd
import shutil
from typing import Mapping, Sequence

from upgraderd.config.validators import worker_ids
from upgraderd.core.seams import Exit
from upgraderd.errors import SpawnError
from upgraderd.system import channeldir
from upgraderd.contract.env import HANDOFF_DIR as ENV_DIR

SHIM = ("/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"')


class PosixProcessAPI:
    """The real implementation, on posix_spawn and waitpid."""

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], fds: Sequence[int],
              cwd: str | None = None, user: str | None = None, group: str | None = None) -> int:
        """Start argv with `fds` at 3, 4, ... as `user`/`group`; return the pid or raise SpawnError."""
        actions = _fd_actions(fds)
        args = [*SHIM, *argv]
        if cwd is not None:
            args = ["/bin/sh", "-c", 'cd "$0" || exit 127; exec "$@"', cwd, *args]
        args = [*privilege_argv(user, group), *args]
        if user is not None or group is not None:
            channeldir.grant(env.get(ENV_DIR), *worker_ids(user, group))
        try:
            return os.posix_spawn(args[0], args, dict(env), file_actions=actions, setpgroup=0)
        except OSError as e:
            raise SpawnError(f"cannot start {argv[0]!r}: {e.strerror}") from None
        except ValueError as e:  # an embedded NUL byte in argv or env
            raise SpawnError(f"cannot start {argv[0]!r}: {e}") from None

    def kill(self, pid: int, sig: int) -> None:
        """Send `sig` to `pid`; a process that is already gone is not an error."""
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def reap(self) -> list[Exit]:
        """Collect every child that has exited, without blocking."""
        out: list[Exit] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return out
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if pid == 0:
                return out
            if os.WIFSIGNALED(status):
                out.append(Exit(pid, signal=os.WTERMSIG(status)))
            elif os.WIFEXITED(status):
                out.append(Exit(pid, code=os.WEXITSTATUS(status)))


def privilege_argv(user: str | None, group: str | None) -> list[str]:
    """Return the setpriv prefix that runs a program as `user`/`group` ([] if nothing changes)."""
    if user is None and group is None:
        return []
    try:
        uid, gid = worker_ids(user, group)
    except KeyError as e:
        raise SpawnError(f"no such user or group: {e}") from None
    if (uid, gid) == (os.geteuid(), os.getegid()):
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise SpawnError("running workers as another user needs setpriv (util-linux)")
    groups = "--init-groups" if user is not None else "--clear-groups"
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", groups, "--"]


def user_env(user: str | None) -> dict[str, str]:
    """Return HOME, USER and LOGNAME for a worker run as `user` ({} for the master's own)."""
    if user is None:
        return {}
    try:
        pw = pwd.getpwuid(worker_ids(user, None)[0])
    except KeyError:
        return {}
    return {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name}


def _fd_actions(fds: Sequence[int]) -> list[tuple[int, ...]]:
    """Return posix_spawn file actions that put `fds` at 3, 4, ... in the child.

    Sources are first copied above every source and target, so that placing
    one fd can never overwrite another that is still to be placed. dup2'd
    fds do not carry FD_CLOEXEC, so the temporary copies are closed again.
    """
    if not fds:
        return []
    high = max(max(fds), 3 + len(fds)) + 1
    actions: list[tuple[int, ...]] = []
    for i, fd in enumerate(fds):
        actions.append((os.POSIX_SPAWN_DUP2, fd, high + i))
    for i in range(len(fds)):
        actions.append((os.POSIX_SPAWN_DUP2, high + i, 3 + i))
        actions.append((os.POSIX_SPAWN_CLOSE, high + i))
    return actions
