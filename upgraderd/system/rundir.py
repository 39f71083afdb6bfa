"""Where the master makes its private directories (metric files, hand-off channels).

Under systemd with `RuntimeDirectory=` (the shipped units: `/run/upgraderd`, a
tmpfs), `$RUNTIME_DIRECTORY`; otherwise `$TMPDIR` (or /tmp). Each worker
creates its metric files and binds its hand-off channel there as it starts, so
at a reload a generation creates about six files per worker. On a disk-backed
/tmp (ext4 here) a 128-worker generation cost 874-986 ms of CPU and the master
240 ms per reload, against 769-810 ms and 190 ms on a tmpfs (`python -m
bench.scale --runtime-dir tmpdir|tmpfs`, docs/prefork.md).

Hazard: the variable is the service manager's, but a directory it names is
used only if it is a real directory (not a symlink), owned by this user and
writable by no one else; otherwise $TMPDIR is, as before.
"""

from __future__ import annotations

import os
import stat
import tempfile

VARIABLE = "RUNTIME_DIRECTORY"


def base() -> str:
    """Return the directory to make private directories in."""
    # systemd separates several RuntimeDirectory= entries with ':'; the first is ours.
    first = os.environ.get(VARIABLE, "").split(":")[0]
    if first and os.path.isabs(first) and _ours(first):
        return first
    return tempfile.gettempdir()


def _ours(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022
