"""Upgrade the master itself in place (SIGUSR2): exec the new upgraderd, same pid.

The old master writes its hand-over record (core/handover.py) into a memfd,
makes the fds it names inheritable and execs `python -m upgraderd run ...`.
Because the pid does not change, the workers stay its children (waitpid still
works), systemd's MAINPID and the pidfile stay right, and the workers'
NOTIFY_SOCKET address stays valid. The new master adopts it all and then
rolls a new generation, exactly as on SIGHUP.

Hazards handled here:
- exec resets signal handlers to their defaults, and SIGHUP's or SIGTERM's
  default would kill the master in the window before the new one installs its
  handlers. So the handled signals are *blocked* across exec (the mask is
  inherited) and the new master unblocks them after installing its handlers:
  anything that arrived in between is delivered then, not lost.
- If exec fails (a broken interpreter path, say), the fds are made
  non-inheritable again, the mask restored, and the old master carries on.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Sequence

from upgraderd.system.signals import HANDLED

ENV = "UPGRADERD_REEXEC_FD"


def exec_master(payload: bytes, fds: Sequence[int], argv: Sequence[str],
                pending: Sequence[int] = (), executable: str = sys.executable) -> OSError:
    """Exec the new master with `payload`; return the error if exec failed (else never returns).

    `pending` are signals the old master received but has not acted on: they
    are raised again while blocked, so they stay pending across the exec and
    reach the new master once its handlers are installed.
    """
    memfd = os.memfd_create("upgraderd-state", 0)
    os.write(memfd, payload)
    os.lseek(memfd, 0, os.SEEK_SET)
    inheritable = [*fds, memfd]
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    for sig in pending:
        os.kill(os.getpid(), sig)
    try:
        for fd in inheritable:
            os.set_inheritable(fd, True)
        env = {**os.environ, ENV: str(memfd)}
        os.execve(executable, [executable, "-m", "upgraderd", *argv], env)
    except OSError as e:
        for fd in fds:
            os.set_inheritable(fd, False)
        os.close(memfd)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return e
    raise AssertionError("unreachable: execve returned without an error")


def inherited() -> bytes | None:
    """Return the hand-over an old master passed us, or None on a normal start."""
    raw = os.environ.pop(ENV, None)
    if raw is None:
        return None
    with os.fdopen(int(raw), "rb") as f:
        return f.read()
