"""What a warm standby template imports ahead of a HUP, and the check that it is still what is on disk.

A standby (`workers.warm`, apps/template.py) is started after a generation
became ACTIVE and is handed the next generation's app at the next HUP. It
always imports what a HUP does not change (the worker library). Beyond that:

- `asgi`: for an `asgi:`/`wsgi:` app, upgraderd's own ASGI server and the
  libraries it runs on (httptools, wsproto, uvloop): `STACK`;
- `workers.preload`: modules the operator names (FastAPI, Django, ...),
  which a deploy may replace on disk between the standby's start and the HUP.

`Snapshot` records, for every module the preload brought into sys.modules
that has a file, its (mtime_ns, size, inode). At the HUP, `changed()` stats
them again: any difference (a file rewritten, replaced by a rename, or gone)
means the standby holds code the new generation must not run, and the
template exec's itself afresh (apps/template.py) instead.

Hazards: a module imported at preload runs its import-time code in the
standby, long before the HUP; a module that starts a thread there makes
every fork unsafe (the same rule as for the app). A module that fails to
import is reported and skipped: the app's own import then fails, or not,
the ordinary way. The stat check sees files, not what a module reads at
import (data files, environment): those must not be preloaded.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback

from upgraderd.contract.standby import ASGI

STACK = ("httptools", "wsproto", "uvloop", "upgraderd.apps.asgi.entry", "upgraderd.apps.asgi.websocket",
         "upgraderd.apps.asgi.wsgi")

Stamp = tuple[int, int, int]   # mtime_ns, size, inode


def _stamp(path: str) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class Snapshot:
    """The files of the modules a standby preloaded, as they were when it imported them."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[str, Stamp | None]] = {}   # path -> (module, stamp)

    def load(self, modules: list[str]) -> None:
        """Import `modules` (ASGI: the server's stack); record the files of every module that came with them."""
        if not modules:
            return
        started, before = time.monotonic(), set(sys.modules)
        names = [m for name in modules for m in (STACK if name == ASGI else (name,))]
        for name in names:
            try:
                importlib.import_module(name)
            except ImportError as e:
                if name not in STACK or name.startswith("upgraderd"):
                    print(f"upgraderd template {os.getpid()}: cannot preload {name}: {e}", file=sys.stderr, flush=True)
            except Exception:
                print(f"upgraderd template {os.getpid()}: cannot preload {name}:", file=sys.stderr, flush=True)
                traceback.print_exc()
        for name in set(sys.modules) - before:
            path = getattr(sys.modules.get(name), "__file__", None)
            if isinstance(path, str):
                self.files[path] = (name, _stamp(path))
        print(f"upgraderd template {os.getpid()}: standby preloaded {', '.join(modules)} "
              f"({len(set(sys.modules) - before)} modules) in {(time.monotonic() - started) * 1000:.0f} ms",
              file=sys.stderr, flush=True)

    def changed(self) -> str | None:
        """Return why the preloaded code is stale (the first file that differs), or None."""
        for path, (name, stamp) in self.files.items():
            now = _stamp(path)
            if now != stamp:
                what = "is gone" if now is None else "changed on disk"
                return f"module {name} ({path}) {what} since the standby imported it"
        return None
