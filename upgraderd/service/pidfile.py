"""The pidfile and the lock that makes it trustworthy.

- `PATH` holds the master's pid. It is written atomically (a temporary file,
  then rename) only once generation 1 is ACTIVE, and removed on a clean stop,
  so its presence means "this master serves".
- `PATH.lock` is flock()ed by the master for its whole life, from before it
  binds anything, and holds the master's pid. A second `upgraderd run` with
  the same pidfile fails at once with "already running (pid N)", even while
  the first is still starting and no pidfile exists yet. The kernel drops the
  lock when the master dies, however it dies, so a pidfile left behind by a
  SIGKILLed master is recognised as stale, even if its pid has been reused,
  and replaced with a warning. The lock file itself is never removed: removing
  it could let two masters lock two different files of the same name.

Clients (`upgraderd reload`, `stop`, `status`) only read the pidfile; they
also check that the pid is alive and is an upgraderd process before
signalling it, so a stale file never makes them signal a stranger.
"""

from __future__ import annotations

import fcntl
import os

from upgraderd.errors import UpgraderdError


class AlreadyRunning(UpgraderdError):
    """Another master holds the lock of this pidfile."""

    def __init__(self, pid: int | None, path: str) -> None:
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"already running ({who}); pidfile {path}")
        self.pid = pid


class NotRunning(UpgraderdError):
    """No live master is named by the pidfile."""


def read_pid(path: str) -> int | None:
    """Return the pid written in `path`, or None if it is missing or not a pid."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(64).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def is_upgraderd(pid: int) -> bool:
    """Return True if `pid` is a live (non-zombie) upgraderd process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    if stat[stat.rindex(b")") + 2:][:1] == b"Z":
        return False
    # `upgraderd ...` (a script: python /path/bin/upgraderd) or `python -m upgraderd ...`;
    # not merely a command line that mentions the word, such as a checkout's path.
    args = cmdline.split(b"\0")
    if any(os.path.basename(a) == b"upgraderd" for a in args[:2]):
        return True
    return any(a == b"-m" and b == b"upgraderd" for a, b in zip(args[:3], args[1:4]))


def find_master(path: str) -> int:
    """Return the pid of the live master named by pidfile `path`; raise NotRunning."""
    if not os.path.exists(path):
        raise NotRunning(f"no master is running: pidfile {path} does not exist")
    pid = read_pid(path)
    if pid is None:
        raise NotRunning(f"no master is running: pidfile {path} does not hold a pid")
    if not is_upgraderd(pid):
        raise NotRunning(f"no master is running: pid {pid} in {path} is not a live upgraderd "
                         "(stale pidfile)")
    return pid


class PidFile:
    """The master's side: lock, write once serving, remove at a clean stop."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.lock_path = self.path + ".lock"
        self._lock_fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; raise AlreadyRunning or OSError; return a stale-pidfile warning, if any."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(read_pid(self.lock_path) or read_pid(self.path), self.path) from None
        self._lock_fd = fd
        self.claim()
        if not os.path.exists(self.path):
            return None
        return (f"stale pidfile {self.path} (pid {read_pid(self.path) or '?'} is not running); "
                "it will be replaced once this master serves")

    def adopt(self, fd: int) -> None:
        """Keep the lock an old master held and passed on across its USR2 exec."""
        os.set_inheritable(fd, False)
        self._lock_fd = fd

    def claim(self) -> None:
        """Write our pid into the lock file (again after daemonizing changed it)."""
        assert self._lock_fd is not None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    def fileno(self) -> int:
        """Return the lock's fd (to keep it open across daemonizing)."""
        assert self._lock_fd is not None
        return self._lock_fd

    def write(self) -> None:
        """Write our pid to the pidfile atomically."""
        write_atomic(self.path, f"{os.getpid()}\n")

    def remove(self) -> None:
        """Remove the pidfile if it is ours, and release the lock."""
        if read_pid(self.path) == os.getpid():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def write_atomic(path: str, text: str) -> None:
    """Replace `path` with `text` so that a reader sees the old or the new file, never a part."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
