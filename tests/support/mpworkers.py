"""Short-lived processes that write real worker metric files, for tests and bench.

Starting a Python worker per replacement costs ~0.1 s; forking one from a
process that already imported the writer costs a millisecond. The forked child runs the built-in workers' own
`ConnectionMetrics` (so the files are exactly what a worker writes), flushes,
and exits; the factory reaps it and reports its pid, which the caller then
folds as the master would.

    python -m tests.support.mpworkers      (from the repository root, with UPGRADERD_METRICS_DIR set)
    stdin:  "<connections> <bytes> <open>\\n" per worker; stdout: its pid
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import ROOT


def _serve() -> int:
    from upgraderd.apps.connmetrics import ConnectionMetrics
    for line in sys.stdin:
        conns, nbytes, still_open = (int(x) for x in line.split())
        pid = os.fork()
        if pid == 0:
            m = ConnectionMetrics(["web"], enabled=True)
            for _ in range(conns):
                m.accepted("web")
                m.received("web", nbytes)
                m.sent("web", nbytes)
            for _ in range(conns - still_open):
                m.closed("web")
            m.flush()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(pid if status == 0 else -1, flush=True)
    return 0


class WorkerFactory:
    """Drive a `python -m tests.support.mpworkers` process writing into `directory`."""

    def __init__(self, directory: str) -> None:
        env = {**os.environ, "UPGRADERD_METRICS_DIR": directory}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.mpworkers"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, cwd=ROOT, text=True)

    def run(self, connections: int, nbytes: int = 0, still_open: int = 0) -> int:
        """Run one worker to completion; return its (already reaped) pid."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{connections} {nbytes} {still_open}\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        assert pid > 0, "the forked worker failed"
        return pid

    def close(self) -> None:
        """Stop the factory process."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


if __name__ == "__main__":
    raise SystemExit(_serve())
