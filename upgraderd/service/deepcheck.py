"""`upgraderd check --deep`: import a `module:factory` app the way its template will.

The plain check finds the app's module without importing it (config/appspec.py):
importing runs the user's code. A misspelt factory, or a module that raises
at import, then surfaces only when a generation starts. `--deep` imports it
in a child process, through the template's own `load()`, with the workers'
user, group, working directory and environment, and reports the exception's
last line at the location of the `app:` key.

Hazards: the child runs the app's import-time code, which may hang or fork;
it is killed (by its pid) after `timeout` seconds. Nothing of the app runs in
this process.
"""

from __future__ import annotations

import os
import subprocess
import sys

from upgraderd.config import source
from upgraderd.config.checks import node_at
from upgraderd.config.schema import Config
from upgraderd.errors import SpawnError
from upgraderd.system.process import privilege_argv

# The template's own loader, so the check fails exactly where a generation would.
PROBE = ("import sys, traceback\n"
         "from upgraderd.apps.template import load\n"
         "try:\n"
         "    load(sys.argv[1])\n"
         "except BaseException as e:\n"
         "    print(traceback.format_exception_only(e)[-1].strip(), file=sys.stderr)\n"
         "    sys.exit(3)\n")


def app_problem(cfg: Config, timeout: float) -> str | None:
    """Import cfg's `module:factory` app in a child; return the located problem, or None."""
    w = cfg.workers
    if w.app is None or ":" not in w.app:
        return None
    where = _location(cfg)
    try:
        argv = [*privilege_argv(w.user, w.group), sys.executable, "-c", PROBE, w.app]
    except SpawnError as e:
        return f"{where}: workers.app: cannot import {w.app!r}: {e}"
    try:
        done = subprocess.run(argv, env={**os.environ, **w.env}, cwd=w.cwd, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"{where}: workers.app: importing {w.app!r} did not finish within {timeout:g}s"
    except OSError as e:
        return f"{where}: workers.app: cannot import {w.app!r}: {e.strerror or e}"
    if done.returncode == 0:
        return None
    last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return f"{where}: workers.app: cannot import {w.app!r}: {last[:500]}"


def _location(cfg: Config) -> str:
    """Return `FILE:LINE:COLUMN` of the `app:` value in cfg's file (FILE alone if not found)."""
    try:
        root = source.compose(source.read_text(cfg.path), cfg.path)
    except Exception:   # the file changed since it was loaded: the name is still worth giving
        return cfg.path
    node = node_at(root, "workers", "app") if root is not None else None
    if node is None:
        return cfg.path
    return f"{cfg.path}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"
