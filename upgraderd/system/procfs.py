"""Read what /proc says about other processes, as untrusted, bounded input.

Every read is capped in size, every field parsed strictly, and every failure
(the process exited, permission denied, garbage) reads as "unknown": callers
then decide the safe way, which is never to signal or adopt anything.

/proc/PID/environ shows the environment a process was started with, even if
it later unset variables (glibc only moves the pointers): a worker that called
`upgraderd.worker.listeners()` still shows its LISTEN_* variables there.
"""

from __future__ import annotations

import os
import re
import stat

MAX_READ = 1 << 20
PID_MAX = 1 << 22  # the kernel's highest possible pid_max
_SOCKET_LINK = re.compile(r"socket:\[(\d+)\]")


def small_int(text: str, digits: int = 7) -> int | None:
    """Return `text` as an int if it is 1 to `digits` ASCII digits, else None (no Unicode digits)."""
    if 0 < len(text) <= digits and text.isascii() and text.isdigit():
        return int(text)
    return None


def valid_pid(value: object) -> bool:
    """Return True if `value` is an int that can be a pid (bools are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 < value < PID_MAX


def read_bounded(path: str, limit: int = MAX_READ) -> bytes | None:
    """Return at most `limit` bytes of the regular file at `path`; None if it is anything else.

    No symlink is followed at the end and no FIFO blocks the reader: a file a
    local user planted must not redirect or stall the master.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, size = [], 0
        while size < limit and (chunk := os.read(fd, min(65536, limit - size))):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def status_fields(pid: int) -> dict[str, str]:
    """Return /proc/PID/status as {field: value} ({} if unreadable)."""
    raw = read_bounded(f"/proc/{pid}/status", 65536)
    if raw is None:
        return {}
    out = {}
    for line in raw.decode("ascii", "replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def ppid_uid_state(pid: int) -> tuple[int, int, str] | None:
    """Return (parent pid, real uid, state letter) of `pid`, or None if unknown."""
    f = status_fields(pid)
    try:
        return int(f["PPid"]), int(f["Uid"].split()[0]), f["State"][:1]
    except (KeyError, ValueError, IndexError):
        return None


def environ(pid: int) -> dict[str, str] | None:
    """Return the environment `pid` was started with, or None if unreadable."""
    raw = read_bounded(f"/proc/{pid}/environ")
    if raw is None:
        return None
    out: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            out[key.decode("ascii", "replace")] = value.decode("utf-8", "replace")
    return out


def cmdline(pid: int) -> list[bytes]:
    """Return the argv of `pid` ([] if unknown)."""
    raw = read_bounded(f"/proc/{pid}/cmdline", 65536)
    return raw.rstrip(b"\0").split(b"\0") if raw else []


def is_master(pid: int) -> bool:
    """Return True if `pid` is a live process running `upgraderd run` (or `python -m upgraderd run`)."""
    facts = ppid_uid_state(pid)
    if facts is None or facts[2] in ("Z", "X"):
        return False
    args = cmdline(pid)
    if args and args[0].startswith(b"upgraderd: master"):   # its title (worker/proctitle.py)
        return True
    if any(os.path.basename(a) == b"upgraderd" for a in args[:2]):
        return b"run" in args
    module = any(a == b"-m" and b == b"upgraderd" for a, b in zip(args[:3], args[1:4]))
    return module and b"run" in args


def socket_owners(inodes: set[int]) -> dict[int, set[int]]:
    """Return {pid: the inodes among `inodes` it holds an fd of}, for every process we may inspect."""
    found: dict[int, set[int]] = {}
    if not inodes:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds:
            try:
                m = _SOCKET_LINK.fullmatch(os.readlink(f"/proc/{entry}/fd/{fd}"))
            except OSError:
                continue
            if m and int(m.group(1)) in inodes:
                found.setdefault(int(entry), set()).add(int(m.group(1)))
    return found
