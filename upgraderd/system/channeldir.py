"""The master's hand-off channel directory: where its workers' channels live, and no one else's.

Workers bind their hand-off channels at `DIR/handoff-<gen>-<slot>`
(upgraderd/contract/wire.py). DIR is made here, once per master:
- a fresh name from mkdtemp (`upgraderd-<pid>-handoff-XXXXXXXX`, created
  with O_EXCL semantics, mode 0700), so no local user can make it first or
  guess it, and no other user can bind or connect in it;
- owned by the workers' user when they run as another one (`grant`);
- kept across a USR2 re-exec (the successor reads UPGRADERD_HANDOFF_DIR from
  the environment it inherits, and keeps it only if it still is a directory
  of ours, mode 0700, not a symlink), removed when the master exits; those
  of masters that died without removing theirs (SIGKILL) are swept by the
  next master that makes one in the same place (their orphans take nothing:
  no generation of a dead master starts again).

The master marks a stop there (`mark_stopping`) before it drains for it,
so a worker can tell a stop from a reload (contract/wire.py `stop_marker`).

DIR is made in system/rundir.py's base: $RUNTIME_DIRECTORY under systemd, else $TMPDIR.

Hazard: a Unix socket path is at most 107 bytes. A base whose path would
not leave room for the channel names (or that holds whitespace, which
/proc/net/unix cannot show unambiguously) is passed over for /tmp.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from typing import MutableMapping

from upgraderd.contract.env import HANDOFF_DIR as ENV_DIR
from upgraderd.contract.wire import DIR_PREFIX, stop_marker
from upgraderd.system import rundir

log = logging.getLogger("upgraderd")

# "/", the random part (8), "/handoff-" (9), a generation of 9 digits, "-", a slot of 4.
_ROOM = 32


def prepare(environ: MutableMapping[str, str]) -> str:
    """Return the channel directory for this master, made now or kept from a USR2 predecessor;
    record it in `environ` (the workers inherit it from there)."""
    kept = environ.get(ENV_DIR, "")
    if kept and _ours(kept):
        return kept
    base = rundir.base()
    prefix = DIR_PREFIX.format(master=os.getpid())
    if len(base) + 1 + len(prefix) + _ROOM > 107 or any(c.isspace() for c in base):
        base = "/tmp"
    sweep(base)
    path = tempfile.mkdtemp(prefix=prefix, dir=base)
    environ[ENV_DIR] = path
    return path


def sweep(base: str) -> int:
    """Remove the channel directories in `base` of masters that are gone (SIGKILLed: none removed
    its own); return how many. Only ours (our euid, a real directory) named for a dead pid."""
    removed = 0
    try:
        entries = list(os.scandir(base))
    except OSError:
        return 0
    for entry in entries:
        pid = _pid_of(entry.name)
        if pid is None or _alive(pid):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


def _pid_of(name: str) -> int | None:
    head, sep, rest = name.partition("-")
    pid, sep2, tail = rest.partition("-")
    ok = head == "upgraderd" and sep and sep2 and pid.isdigit() and len(pid) <= 9 and tail.startswith("handoff-")
    return int(pid) if ok else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: someone's process has that pid
    return True


def _ours(path: str) -> bool:
    """Return True if `path` is a real directory, mode 0700, named for this master's pid (a USR2
    re-exec keeps it), owned by our euid (or by anyone, for root: it gave it to the workers)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
            and (st.st_uid == os.geteuid() or os.geteuid() == 0)
            and os.path.basename(path).startswith(DIR_PREFIX.format(master=os.getpid())))


def grant(path: str | None, uid: int, gid: int) -> None:
    """Give the directory to the workers' user (a root master running them as another)."""
    if not path or path != os.environ.get(ENV_DIR):
        return
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(path, uid, gid, follow_symlinks=False)
    except OSError as e:
        log.warning("cannot give the hand-off channel directory %s to uid %d: %s", path, uid, e)


def mark_stopping(path: str) -> bool:
    """Create the stop marker in the directory (before a stop's drain signals); return True if it is there.

    The workers' user may write in the directory, so nothing there is
    followed: O_EXCL|O_NOFOLLOW never opens what a worker put at that name
    (a symlink to a file of root's), and a name already taken counts as
    marked (a worker can only fool itself and its siblings).
    """
    if not path.startswith("/") or path != os.environ.get(ENV_DIR):
        return False
    try:
        os.close(os.open(stop_marker(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644))
    except FileExistsError:
        return True
    except OSError as e:
        log.warning("cannot mark the stop in %s: %s (draining workers will take it for a reload)", path, e)
        return False
    return True


def remove(path: str) -> None:
    """Remove the directory and what the workers left in it (at the master's exit)."""
    shutil.rmtree(path, ignore_errors=True)
