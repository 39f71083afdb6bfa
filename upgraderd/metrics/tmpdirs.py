"""The master's private metrics directories (system/rundir.py: $RUNTIME_DIRECTORY or $TMPDIR),
and those dead masters left.

A private directory is named `upgraderd-metrics-<pid>-<random>`, after the
master that made it. A master killed with SIGKILL cannot remove its own, so
each master, when it makes one, removes those of masters that are gone.

Hazards: $TMPDIR is usually /tmp, which every local user can write. So a
directory is removed only if it is a real directory (not a symlink), owned
by this user, named with a pid, and that pid is not running; `rmtree` works
through file descriptors and never follows a link inside. A pid reused by an
unrelated process keeps its directory until that process ends; a name
without a pid (from an older upgraderd) is left alone.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import tempfile

from upgraderd.system import rundir

log = logging.getLogger("upgraderd")

PREFIX = "upgraderd-metrics-"
_OWNED = re.compile(re.escape(PREFIX) + r"([0-9]{1,10})-[A-Za-z0-9_]+\Z")


def make_private() -> str:
    """Create and return a fresh private directory named after this master's pid."""
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=rundir.base())


def remove_private(path: str) -> None:
    """Remove a private directory and what it holds."""
    shutil.rmtree(path, ignore_errors=True)


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.ESRCH
    return False


def clean_stale(tmpdir: str | None = None) -> int:
    """Remove the private directories of masters that are no longer running; return how many."""
    base = tmpdir or rundir.base()
    gone = 0
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    for name in names:
        m = _OWNED.match(name)
        if m is None or int(m.group(1)) == os.getpid() or not _pid_gone(int(m.group(1))):
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            continue
        shutil.rmtree(path, ignore_errors=True)
        gone += not os.path.lexists(path)
    if gone:
        log.info("removed %d metrics director%s of masters that are gone, under %s",
                 gone, "y" if gone == 1 else "ies", base)
    return gone


def probe_writable(path: str) -> None:
    """Raise OSError unless a file can be created in `path` (read-only mounts, permissions)."""
    probe = os.path.join(path, f".upgraderd-probe-{os.getpid()}")
    try:
        os.remove(probe)  # left by a master of the same pid that was killed right here
    except FileNotFoundError:
        pass
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.close(fd)
    os.remove(probe)
