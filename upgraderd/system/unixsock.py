"""Unix-domain stream listeners: bind the socket file safely, and remove it only at a clean stop.

The master binds a path listener itself, as it binds a TCP one, and keeps the
socket across generations and across a USR2 re-exec (the fd travels in the
hand-over). The file is what clients connect to, so:

- An existing file at the path is looked at with lstat, never followed:
  a socket nobody listens on (connect() is refused) is stale, and is
  replaced with a warning; a socket that accepts is live, and the start (or
  reload) is refused, naming the path and, where /proc shows it, the holder;
  anything else (a file, a symlink, a directory) is refused and left alone.
- The parent directory must exist; one that any user may write without the
  sticky bit is refused, since anyone could swap the file under the master.
  A file is unlinked only after lstat shows the same inode as before, and
  the ownership change does not follow symlinks. The permissions come from
  the umask at bind time, so the file never exists with wider ones.
- The file is removed when the master closes the socket for good: at a
  clean stop, or when a reload drops the listener. Not on USR2 (the same
  socket lives on in the new master) and not on a crash (the file is then
  stale, and the next start replaces it). Only a file this master (or a USR2
  predecessor) created is removed, and only while it is still that file: a
  socket passed by systemd is the socket unit's to remove.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

from upgraderd.config import unixlisten
from upgraderd.config.schema import ListenerSpec
from upgraderd.system import procfs

log = logging.getLogger("upgraderd")

# A socket file's identity: (st_dev, st_ino) as lstat() sees it.
FileId = tuple[int, int]


def bind(spec: ListenerSpec) -> tuple[socket.socket, FileId]:
    """Bind and listen the Unix socket of `spec`, replacing a stale file; return it and its file's id.

    Raises OSError whose strerror says what is wrong with the path.
    """
    path = str(spec.path)
    parent = os.path.dirname(path)
    _check_parent(parent)
    _clear(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ident: FileId | None = None
    try:
        if spec.permissions is not None:
            # bind() creates the file with 0777 & ~umask: set the mode there, so that
            # it never exists with wider permissions than asked for.
            old = os.umask(0o777 & ~int(spec.permissions, 8))
            try:
                sock.bind(path)
            finally:
                os.umask(old)
        else:
            sock.bind(path)
        ident = file_id(path)
        if ident is None:
            raise OSError(errno.ENOENT, "the socket file vanished right after bind")
        uid, gid = unixlisten.ids(spec)
        if (uid, gid) != (-1, -1):
            os.chown(path, uid, gid, follow_symlinks=False)
        sock.listen(spec.backlog)
    except OSError:
        sock.close()
        if ident is not None:
            remove(path, ident)  # the file this call created: not left behind as a stale one
        raise
    return sock, ident


def set_access(spec: ListenerSpec, ident: FileId) -> None:
    """Give the socket file of a kept listener the owner, group and permissions `spec` asks for.

    A key left out leaves that part as it is. The file is pinned with an
    O_PATH descriptor opened without following a symlink, checked to be the
    master's socket (`ident`), and changed through that descriptor: a file
    swapped in meanwhile is never touched.
    """
    path = str(spec.path)
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != ident or not stat.S_ISSOCK(st.st_mode):
            return
        pinned = f"/proc/self/fd/{fd}"
        uid, gid = unixlisten.ids(spec)
        if (uid != -1 and uid != st.st_uid) or (gid != -1 and gid != st.st_gid):
            os.chown(pinned, uid, gid)
            log.info("socket file %s: owner and group now %s:%s", path, spec.owner or "-", spec.group or "-")
        if spec.permissions is not None and stat.S_IMODE(st.st_mode) != int(spec.permissions, 8):
            os.chmod(pinned, int(spec.permissions, 8))
            log.info("socket file %s: permissions now %s", path, spec.permissions)
    except OSError as e:
        log.warning("socket file %s: cannot apply owner, group or permissions: %s", path, e.strerror)
    finally:
        os.close(fd)


def _check_parent(parent: str) -> None:
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        raise OSError(errno.ENOENT, f"directory {parent} does not exist; create it first "
                      "(systemd: RuntimeDirectory=)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"{parent} is not a directory")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise OSError(errno.EPERM, f"directory {parent} is writable by every user and has no sticky "
                      "bit, so anyone could replace the socket file; use a directory of your own")


def _clear(path: str) -> None:
    """Make room at `path`: remove a stale socket file; raise OSError for anything else there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"the path exists and is not a socket ({_kind(st.st_mode)}); "
                      "it is left alone: remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # nothing listens: stale
    except TimeoutError:
        raise OSError(errno.EADDRINUSE, _live(path)) from None
    except OSError as e:
        if e.errno == errno.EAGAIN:
            # The backlog is full, so something listens: live.
            raise OSError(errno.EADDRINUSE, _live(path)) from None
        raise OSError(e.errno, f"cannot tell whether the socket there is in use: {e.strerror}") from None
    else:
        raise OSError(errno.EADDRINUSE, _live(path))
    finally:
        probe.close()
    if file_id(path) != (st.st_dev, st.st_ino):
        raise OSError(errno.EEXIST, "the socket file changed while it was checked; try again")
    os.unlink(path)
    log.warning("replaced stale socket file %s (nothing listened on it)", path)


def _live(path: str) -> str:
    holders = holders_of(path)
    who = f" (held by pid {', '.join(map(str, holders))})" if holders else ""
    return f"a live socket is there: another process listens on it{who}; stop it or choose another path"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISREG, "a regular file"), (stat.S_ISFIFO, "a FIFO")):
        if test(mode):
            return name
    return "a device or other special file"


def holders_of(path: str) -> list[int]:
    """Return the pids that hold a listening socket bound to `path`, as far as /proc shows them."""
    raw = procfs.read_bounded("/proc/net/unix", 64 << 20) or b""
    inodes = set()
    for line in raw.decode(errors="replace").splitlines()[1:]:
        fields = line.split(None, 7)
        # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 is "listening".
        if len(fields) == 8 and fields[7] == path and int(fields[3], 16) & 0x10000 and fields[6].isdigit():
            inodes.add(int(fields[6]))
    return sorted(procfs.socket_owners(inodes)) if inodes else []


def file_id(path: str) -> FileId | None:
    """Return the id of the socket file at `path`, or None if there is none."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def remove(path: str, ident: FileId) -> None:
    """Unlink the socket file at `path` if it is still the one with `ident`."""
    if file_id(path) != ident:
        log.info("left %s in place: it is no longer the socket file this master created", path)
        return
    try:
        os.unlink(path)
    except OSError as e:
        log.warning("cannot remove socket file %s: %s", path, e.strerror)
        return
    log.info("removed socket file %s", path)


def check_passed(sock: socket.socket, spec: ListenerSpec) -> str | None:
    """Return what is wrong with a passed or adopted socket for path listener `spec`, or None."""
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        return "is not a Unix stream socket"
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "is not listening"
    name = sock.getsockname()
    if name != spec.path:
        return f"is bound to {name!r}"
    return None
