"""Run a built-in app: one event loop, or `threads: N` loops, over the inherited listeners."""

from __future__ import annotations

import os
import sys
from typing import Callable

from upgraderd import worker
from upgraderd.contract import env
from upgraderd.apps import threaded
from upgraderd.apps.server import ConnectionProtocol, Server
from upgraderd.worker import proctitle


def main(factory: Callable[[str], ConnectionProtocol], idle_grace: float = 1.0,
         announce: bool = True) -> int:
    """Run a built-in app over the inherited listeners; return the exit code."""
    socks = worker.listeners()
    if not socks:
        print("error: no listening sockets (LISTEN_FDS/LISTEN_PID not set for this process); "
              "run me under upgraderd", file=sys.stderr)
        return 2
    proctitle.worker()   # also when exec'd without a template (prefork: false)
    threads = int(os.environ.get(env.THREADS, "1") or "1")
    if threads > 1:
        return threaded.serve(socks, factory, threads, idle_grace, announce)
    return Server(socks, factory, idle_grace, announce).serve()
