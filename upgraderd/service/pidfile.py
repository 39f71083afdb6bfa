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

Both names may sit in a directory other local users can write (/tmp). So the
lock is opened with O_NOFOLLOW, created with O_EXCL, and refused unless it is
a regular file of ours with one link; temporary files get a random name and
O_EXCL|O_NOFOLLOW. A planted symlink is refused, never followed.

Identity: a master is the process that holds `PATH.lock`, not one whose argv
looks right. Design note: the lock stays an flock, and the proof is read from
/proc/PID/fdinfo, whose `lock:` lines list the locks held through that very
open file. The alternatives fall short: /proc/locks names the pid that took
an flock, which after --daemon's forks is a pid that has exited; and an OFD
lock's F_OFD_GETLK reports l_pid -1, so it names no process at all. fdinfo
holds across fork and exec (USR2) because it follows the open file, not the
pid that locked it. Clients open a pidfd, prove the lock, then signal through
the pidfd, so a pid reused in between is never signalled.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import signal
import stat
from typing import Callable

from upgraderd.errors import UpgraderdError
from upgraderd.system import procfs


class AlreadyRunning(UpgraderdError):
    """Another master holds the lock of this pidfile."""

    def __init__(self, pid: int | None, path: str) -> None:
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"already running ({who}); pidfile {path}")
        self.pid = pid


class NotRunning(UpgraderdError):
    """No live master is named by the pidfile."""


class UnsafeFile(UpgraderdError):
    """A file at the lock's or the pidfile's name is not one the master may write through."""


def read_regular(path: str, limit: int) -> bytes | None:
    """Return up to `limit` bytes of the regular file at `path`; None if it is anything else."""
    return procfs.read_bounded(path, limit)


def read_pid(path: str) -> int | None:
    """Return the pid written in `path`, or None if it is missing, not a regular file or not a pid."""
    data = read_regular(path, 64)
    if data is None:
        return None
    text = data.decode("ascii", errors="replace").strip()
    return int(text) if is_pid_text(text) else None


def is_pid_text(text: str) -> bool:
    """Return True if `text` is a pid: 1 to 10 ASCII digits, not 0."""
    return re.fullmatch(r"[0-9]{1,10}", text) is not None and int(text) > 0


def alive(pid: int) -> bool:
    """Return True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2:][:1] != b"Z"


def holds_lock(pid: int, lock_path: str) -> bool:
    """Return True if process `pid` holds the flock on the file at `lock_path`."""
    try:
        st = os.stat(lock_path, follow_symlinks=False)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except PermissionError:
        # Another user's master (root's, for an unprivileged `status`): its fds are
        # hidden, /proc/locks is not. The lock file is the holder's to write.
        return _locked(st) and read_pid(lock_path) == pid
    except OSError:
        return False
    for name in fds:
        try:
            fst = os.stat(f"/proc/{pid}/fd/{name}")
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                continue
            with open(f"/proc/{pid}/fdinfo/{name}", encoding="ascii", errors="replace") as f:
                info = f.read(65536)
        except OSError:
            continue
        # `lock:` lines list only the locks held through this open file.
        if re.search(rf"^lock:\s.*\bFLOCK\s+ADVISORY\s+WRITE\s+\S+\s+[0-9a-f]+:[0-9a-f]+:{st.st_ino}\s",
                     info, re.MULTILINE):
            return True
    return False


def _locked(st: os.stat_result) -> bool:
    """Return True if /proc/locks lists an exclusive flock on the file `st` describes."""
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            return any(re.search(rf"\bFLOCK\s+ADVISORY\s+WRITE\s+\S+\s+{dev}\s", line) for line in f)
    except OSError:
        return False


def find_master(path: str) -> int:
    """Return the pid of the master named by pidfile `path` that holds its lock; raise NotRunning."""
    if not os.path.lexists(path):
        raise NotRunning(f"no master is running: pidfile {path} does not exist")
    pid = read_pid(path)
    if pid is None:
        raise NotRunning(f"no master is running: pidfile {path} does not hold a pid")
    if not holds_lock(pid, path + ".lock"):
        raise NotRunning(f"no master is running: pid {pid} in {path} does not hold {path}.lock "
                         "(stale pidfile)")
    return pid


def send_signal(path: str, pid: int, sig: int) -> None:
    """Send `sig` to `pid` only if it still holds the lock of pidfile `path`; raise NotRunning."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NotRunning(f"no master is running: pid {pid} has exited") from None
    try:
        # Proven after the pidfd pins the process: a pid reused later is not this one.
        if not holds_lock(pid, path + ".lock"):
            raise NotRunning(f"no master is running: pid {pid} no longer holds {path}.lock")
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        raise NotRunning(f"no master is running: pid {pid} has exited") from None
    finally:
        os.close(pidfd)


def open_lock(path: str) -> int:
    """Open (or create) the lock file at `path` without following a symlink; raise UnsafeFile."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    for _ in range(8):
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue  # created by someone else since: look at it again
            os.fchmod(fd, 0o644)
            return fd
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeFile(f"{path} is a symbolic link: refusing to follow it "
                                 "(remove it if nothing of yours made it)") from None
            raise
        try:
            _check_ours(fd, path)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise UnsafeFile(f"{path} keeps appearing and disappearing; refusing to use it")


def _check_ours(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(f"{path} is not a regular file; refusing to use it as the lock")
    if st.st_nlink != 1:
        raise UnsafeFile(f"{path} has {st.st_nlink} hard links: refusing to write through it "
                         "(remove it if nothing of yours made it)")
    if st.st_uid != os.geteuid():
        raise UnsafeFile(f"{path} belongs to uid {st.st_uid}, not to us (uid {os.geteuid()}); "
                         "refusing to use it")


class PidFile:
    """The master's side: lock, write once serving, remove at a clean stop."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.lock_path = self.path + ".lock"
        self._lock_fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; raise AlreadyRunning, UnsafeFile or OSError; return a stale-pidfile warning."""
        for _ in range(8):
            fd = open_lock(self.lock_path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise AlreadyRunning(read_pid(self.lock_path) or read_pid(self.path), self.path) from None
            if _is_at(fd, self.lock_path):
                break
            os.close(fd)   # a master that stopped unlinked it after our open: lock the file there now
        else:
            raise UnsafeFile(f"{self.lock_path} keeps being replaced; refusing to use it")
        self._lock_fd = fd
        self.claim()
        if not os.path.lexists(self.path):
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
        """Remove the pidfile if it is ours, then the lock file while still holding it, and release it.

        The lock file goes before the lock is released, and `acquire` locks only
        the file still at the path: a master that opened the old file just
        before the unlink sees the change and starts over, so two masters can
        never each hold a lock.
        """
        if read_pid(self.path) == os.getpid():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        if self._lock_fd is not None:
            if _is_at(self._lock_fd, self.lock_path):
                try:
                    os.unlink(self.lock_path)
                except FileNotFoundError:
                    pass
            os.close(self._lock_fd)
            self._lock_fd = None


def _is_at(fd: int, path: str) -> bool:
    """Return True if `path` (not followed) is the file open as `fd`."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def write_atomic(path: str, text: str, token: Callable[[], str] = lambda: secrets.token_hex(8)) -> None:
    """Replace `path` with `text` (mode 0644) so that a reader sees the old or the new file, never a part.

    The temporary file has a random name and is created with O_EXCL|O_NOFOLLOW:
    whatever another user planted in the directory is never opened, and a
    symlink at `path` itself is replaced by the rename, not followed.
    """
    for _ in range(16):
        tmp = f"{path}.{token()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(errno.EEXIST, f"no free temporary name next to {path}")
    try:
        try:
            os.fchmod(fd, 0o644)  # whatever the umask
            data = text.encode("utf-8")
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
