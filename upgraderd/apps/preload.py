"""What a warm standby template imports ahead of a HUP, and the check that it is still what is on disk.

A standby (`workers.warm`, apps/template.py) is started after a generation
became ACTIVE and is handed the next generation's app at the next HUP. It
always imports what a HUP does not change (the worker library). Beyond that:

- `asgi`: for an `asgi:`/`wsgi:` app, upgraderd's own ASGI server and the
  libraries it runs on (httptools, wsproto, uvloop): `STACK`;
- `workers.preload`: modules the operator names (FastAPI, Django, ...),
  which a deploy may replace on disk between the standby's start and the HUP;
- what the previous template imported from the standard library and the
  installed packages (site-packages): every template writes those module
  names to `DIR/template-modules` (DIR: the master's channel directory,
  mode 0700, owned by the workers' user; `record`), and the next standby
  imports them (`Snapshot.load_recorded`). So a warm standby has FastAPI,
  pydantic, Django... imported before the HUP without `workers.preload`
  (measured in bench/asgi.py). Never a module of the app's own package nor
  one outside those directories: the app is imported at the HUP, from disk.

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
import (data files, environment): those must not be preloaded. The recorded
list is a hint written by the workers' own user, read only by the next
standby (never by the master): names are checked as dotted Python names,
bounded in size and count, and a module that fails to import is skipped.
Import order is the previous template's (sys.modules order), so a package
that looks at what was imported before it sees what it saw there.
"""

from __future__ import annotations

import importlib
import os
import re
import site
import sys
import sysconfig
import time
import traceback

from upgraderd.apps import logline
from upgraderd.contract import env as contract
from upgraderd.contract.standby import ASGI, RECORDED

STACK = ("httptools", "wsproto", "uvloop", "upgraderd.apps.asgi.entry", "upgraderd.apps.asgi.websocket",
         "upgraderd.apps.asgi.wsgi")

Stamp = tuple[int, int, int]   # mtime_ns, size, inode
RECORD = "template-modules"    # in the channel directory: what the last template imported (`record`)
RECORD_BYTES = 1 << 20         # bounds on what a standby reads of it
RECORD_NAMES = 20000
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


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
        if RECORDED in modules:
            modules = [m for m in modules if m != RECORDED]
            self.load(modules)
            self.load_recorded()
            return
        started, before = time.monotonic(), set(sys.modules)
        names = [m for name in modules for m in (STACK if name == ASGI else (name,))]
        for name in names:
            try:
                importlib.import_module(name)
            except ImportError as e:
                if name not in STACK or name.startswith("upgraderd"):
                    logline.log(f"upgraderd template {os.getpid()}: cannot preload {name}: {e}", "WARNING")
            except Exception:
                print(f"upgraderd template {os.getpid()}: cannot preload {name}:", file=sys.stderr, flush=True)
                traceback.print_exc()
        self._stamp(before)
        logline.log(f"upgraderd template {os.getpid()}: standby preloaded {', '.join(modules)} "
                    f"({len(set(sys.modules) - before)} modules) in {(time.monotonic() - started) * 1000:.0f} ms")

    def load_recorded(self) -> None:
        """Import what the previous template imported from the shared directories (`record`), quietly."""
        names = _recorded()
        if not names:
            return
        started, before = time.monotonic(), set(sys.modules)
        for name in names:
            if name in sys.modules:
                continue
            try:
                importlib.import_module(name)
            except (Exception, SystemExit):   # noqa: B036  (a hint: the app's own import decides)
                continue
        self._stamp(before)
        logline.log(f"upgraderd template {os.getpid()}: standby imported {len(set(sys.modules) - before)} modules "
                    f"the previous template had from the standard library and site-packages in "
                    f"{(time.monotonic() - started) * 1000:.0f} ms")

    def _stamp(self, before: set[str]) -> None:
        for name in set(sys.modules) - before:
            path = getattr(sys.modules.get(name), "__file__", None)
            if isinstance(path, str):
                self.files[path] = (name, _stamp(path))

    def changed(self) -> str | None:
        """Return why the preloaded code is stale (the first file that differs), or None."""
        for path, (name, stamp) in self.files.items():
            now = _stamp(path)
            if now != stamp:
                what = "is gone" if now is None else "changed on disk"
                return f"module {name} ({path}) {what} since the standby imported it"
        return None


def _shared_dirs() -> tuple[str, ...]:
    """The directories a HUP does not change: the standard library's and the installed packages'."""
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs.update(site.getsitepackages())
    # Both spellings, so a module's own path needs no realpath (no system call per module).
    return tuple({os.path.join(p, "") for d in dirs for p in (d, os.path.realpath(d))})


def _record_path() -> str | None:
    directory = os.environ.get(contract.HANDOFF_DIR, "")
    return os.path.join(directory, RECORD) if directory.startswith("/") else None


def record(app_module: str) -> None:
    """In a template that imported its app: write the shared modules it holds for the next standby.

    Best effort (no channel directory, a full disk: the next standby imports less). Modules of
    the app's own top-level package are left out even if installed, and so is upgraderd.
    """
    path = _record_path()
    if path is None:
        return
    shared, own = _shared_dirs(), app_module.partition(".")[0]
    names = []
    for name, module in list(sys.modules.items()):
        top = name.partition(".")[0]
        where = getattr(module, "__file__", None)
        if top in (own, "upgraderd", "__main__") or not isinstance(where, str) or not _NAME.fullmatch(name):
            continue
        if where.startswith(shared) and "/../" not in where:
            names.append(name)
    tmp = f"{path}.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(names[:RECORD_NAMES]) + "\n")
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _recorded() -> list[str]:
    """Return the module names the previous template recorded (`record`), valid ones only."""
    path = _record_path()
    if path is None:
        return []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            data = f.read(RECORD_BYTES)
    except OSError:
        return []
    names = data.decode("ascii", errors="replace").split("\n")
    return [n for n in names if _NAME.fullmatch(n)][:RECORD_NAMES]
