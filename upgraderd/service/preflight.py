"""`upgraderd preflight -c FILE`: what a USR2 master upgrade runs before it execs.

The master execs the upgraderd now on disk in place of itself. If that code
cannot even import, or cannot load the config, the exec would replace a
working master with a dead one and orphan its workers. So before the exec
the master runs this command as a child (with a deadline, without blocking its
loop) using the same interpreter and arguments the exec will use, and execs
only if it exits 0.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import upgraderd
from upgraderd.config import schema
from upgraderd.errors import ConfigError, ExitCode


def modules() -> list[str]:
    """Return every module of the package that a master or a worker may import."""
    found = [m.name for m in pkgutil.walk_packages(upgraderd.__path__, "upgraderd.")]
    return sorted(name for name in found if not name.endswith("__main__"))


def run(config_path: str) -> int:
    """Import every module and load the config; print what fails; return the exit code."""
    for name in modules():
        try:
            importlib.import_module(name)
        except Exception as e:  # anything: this is the check that the code can run at all
            print(f"upgraderd preflight: cannot import {name}: {e!r}", file=sys.stderr)
            return ExitCode.FAILED
    try:
        schema.load(config_path)
    except ConfigError as e:
        print(f"upgraderd preflight: {e}", file=sys.stderr)
        return ExitCode.FAILED
    print(f"upgraderd preflight: ok ({len(modules())} modules, {config_path})")
    return ExitCode.OK
