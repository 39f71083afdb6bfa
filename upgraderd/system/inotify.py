"""Watch files for `reload.watch`: inotify through ctypes, and cheap fingerprints.

Why a wrapper of our own rather than a PyPI library: the master needs three
libc calls and a 16-byte event header, driven by its own `select` loop. The
well-kept libraries either run a thread of their own (watchdog) or bring an
event loop or a compiled extension (watchfiles), and the small pure-Python
ones add a dependency for what fits in this module.

The watcher watches *directories*, never the files themselves: an editor's
write-to-temp-then-rename, a deploy tool's `ln -sfn` + rename of `current`,
and kubelet's swap of the `..data` symlink all replace a directory entry, and
a watch on the old inode would go silent. For each path it watches the
directory holding it and the directory holding its resolved target. A
directory that does not exist (yet) is replaced by its nearest existing
ancestor, so its re-creation is seen. Events only say "look again": the core
compares fingerprints to decide.

Only events that name an entry on the way to a watched path count (`names`):
the path's own name, and each symlink met while resolving it (kubelet's
`..data`, a deploy's `current`). Another file in the same directory, written
every 0.1 s, must not push a real config edit's debounce back forever (it
did: more than 15 s). A directory whose entry names are not known (the
nearest existing ancestor of a missing one) counts every event.

A symlink loop among the watched paths is logged once (until it resolves);
the loop's path then fingerprints as missing, like a deleted file.

A watched directory (a release behind `current`) is fingerprinted by its
resolved path and inode only, never by its mtime: workers write into their
release directory, and that must not roll a generation that writes again.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import stat
import struct
from typing import Sequence

log = logging.getLogger("upgraderd")

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW = 0x400, 0x800, 0x4000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
        | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
HEADER = struct.Struct("iIII")   # wd, mask, cookie, len (of the name that follows)
MAX_CONFIG_BYTES = 16 << 20      # a config larger than this is fingerprinted by metadata


class Inotify:
    """One non-blocking inotify instance."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd

    def add(self, path: str) -> int:
        """Watch directory `path`; return the watch descriptor or raise OSError."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), ctypes.c_uint32(MASK))
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return int(wd)

    def remove(self, wd: int) -> None:
        """Stop watch `wd` (already gone is fine: the kernel drops a deleted directory's watch)."""
        self._libc.inotify_rm_watch(self.fd, wd)

    def read(self) -> list[tuple[int, int, bytes]]:
        """Return every pending (wd, mask, name) without blocking."""
        events: list[tuple[int, int, bytes]] = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return events
            except InterruptedError:
                continue
            off = 0
            while off + HEADER.size <= len(buf):
                wd, mask, _cookie, size = HEADER.unpack_from(buf, off)
                name = buf[off + HEADER.size:off + HEADER.size + size].rstrip(b"\0")
                events.append((wd, mask, name))
                off += HEADER.size + size

    def close(self) -> None:
        """Close the instance and every watch with it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def dirs_for(path: str) -> set[str]:
    """Return the directories whose entries decide what `path` is and holds."""
    out = {os.path.dirname(os.path.abspath(path)) or "/"}
    out.add(os.path.dirname(os.path.realpath(path)) or "/")
    return {_existing(d) for d in out}


MAX_HOPS = 40  # symlinks followed while resolving one path, as the kernel's limit


def names(path: str) -> dict[str, set[str]]:
    """Return {directory: entry names in it} met while resolving `path`, symlinks followed.

    Resolution stops at the first missing entry (it is still listed: its
    creation is what to wait for) and after MAX_HOPS symlinks (a loop).
    """
    out: dict[str, set[str]] = {}
    pending = os.path.abspath(path).split("/")[1:]
    cur, hops = "/", 0
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            cur = os.path.dirname(cur)
            continue
        out.setdefault(cur, set()).add(name)
        nxt = os.path.join(cur, name)
        try:
            target = os.readlink(nxt)
        except OSError:
            if not os.path.lexists(nxt):
                break
            cur = nxt
            continue
        hops += 1
        if hops > MAX_HOPS:
            break
        if target.startswith("/"):
            cur = "/"
        pending = target.split("/") + pending
    return out


def _existing(d: str) -> str:
    """Return `d`, or its nearest existing ancestor: watching that reveals `d`'s creation."""
    while not os.path.isdir(d) and d != os.path.dirname(d):
        d = os.path.dirname(d)
    return d


def fingerprint(path: str, content: bool) -> str:
    """Return '' if `path` is missing, else its resolved target, mtime and size (or content hash)."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    if stat.S_ISDIR(st.st_mode):
        return f"{os.path.realpath(path)}:dir:{st.st_ino}"
    meta = f"{os.path.realpath(path)}:{st.st_mtime_ns}:{st.st_size}:{st.st_ino}"
    if not content or not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CONFIG_BYTES:
        return meta
    try:
        # O_NONBLOCK: a FIFO swapped in for the config must not block the master.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 16):
            digest.update(chunk)
        return "sha256:" + digest.hexdigest()
    except OSError:
        return meta
    finally:
        os.close(fd)


def _interest(dirs: set[str], paths: Sequence[str]) -> dict[str, set[str] | None]:
    """Return, for each watched directory, the entry names whose events count (None: all)."""
    found: dict[str, set[str]] = {}
    for p in paths:
        for d, entries in names(p).items():
            found.setdefault(d, set()).update(entries)
    return {d: found.get(d) for d in dirs}


class FileWatcher:
    """The `WatcherAPI` of core/seams.py on inotify; fingerprints by stat and sha256."""

    def __init__(self) -> None:
        self._inotify: Inotify | None = None
        self._wds: dict[str, int] = {}
        self._failed: set[str] = set()
        self._names: dict[str, set[str] | None] = {}  # per watched directory; None: every name
        self._loops: set[str] = set()
        try:
            self._inotify = Inotify()
        except (OSError, AttributeError) as e:
            self._error = f"inotify is unavailable ({e}); watched paths are polled instead"
        else:
            self._error = ""

    def fileno(self) -> int | None:
        """Return the inotify fd, or None when inotify is unavailable."""
        return self._inotify.fd if self._inotify is not None else None

    def watch(self, paths: Sequence[str]) -> list[str]:
        """Watch exactly the directories `paths` need now; return warnings not given before."""
        if self._inotify is None:
            warned, self._error = self._error, ""
            return [warned] if warned and paths else []
        wanted = set().union(*(dirs_for(p) for p in paths)) if paths else set()
        self._names = _interest(wanted, paths)
        for d in set(self._wds) - wanted:
            self._inotify.remove(self._wds.pop(d))
        warnings = []
        for d in sorted(wanted - set(self._wds)):
            try:
                self._wds[d] = self._inotify.add(d)
                self._failed.discard(d)
            except OSError as e:
                if d not in self._failed:
                    self._failed.add(d)
                    hint = " (raise fs.inotify.max_user_watches)" if e.errno == errno.ENOSPC else ""
                    warnings.append(f"cannot watch {d}: {e.strerror}{hint}")
        return warnings

    def changed(self) -> bool:
        """Drain the pending events; return True if any names an entry on the way to a watched path."""
        if self._inotify is None:
            return False
        events = self._inotify.read()
        dir_of = {wd: d for d, wd in self._wds.items()}
        gone = {wd for wd, mask, _ in events if mask & (IN_DELETE_SELF | IN_MOVE_SELF)}
        for wd in gone:   # re-resolved and re-added by the next `watch`
            self._inotify.remove(wd)
        self._wds = {d: wd for d, wd in self._wds.items() if wd not in gone}
        if any(mask & IN_Q_OVERFLOW for _, mask, _ in events):
            log.warning("inotify queue overflowed: events were lost; the watched paths are re-checked")
            return True
        return any(wd in gone or self._counts(dir_of.get(wd), name) for wd, _, name in events)

    def _counts(self, d: str | None, name: bytes) -> bool:
        """Return True if an event on entry `name` of watched directory `d` may change a watched path."""
        wanted = self._names.get(d) if d is not None else None
        return wanted is None or not name or os.fsdecode(name) in wanted

    def fingerprint(self, path: str, content: bool) -> str:
        """Return the fingerprint of `path` ('' if missing); log a symlink loop once."""
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP and path not in self._loops:
                self._loops.add(path)
                log.warning("reload.watch: %s is a symlink loop: treated as missing until it resolves", path)
        else:
            self._loops.discard(path)
        return fingerprint(path, content)

    def close(self) -> None:
        """Close the inotify instance."""
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._wds.clear()
