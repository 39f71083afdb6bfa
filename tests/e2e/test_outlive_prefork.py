"""Orphans of forked workers are taken over, and `stop` after a restart leaves no process (issue 25, finding 2).

A forked worker's /proc/PID/environ is its template's: no LISTEN_FDS, and
the slot of whichever worker started the template. The old takeover read
both from there, so after a master SIGKILL and restart every orphan of a
prefork generation (the shipped default: prefork + warm) was left alone, and
`upgraderd stop` exited 0 while they served on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.support.upgraderd_proc import alive, children, Daemon, echo_config, free_port, ROOT, text_of, wait_until

pytestmark = pytest.mark.e2e

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="pidfd_getfd needs ptrace rights over the "
                                "orphans: root (or yama ptrace_scope 0, not assumed here)")

CYCLES = 10


def serving_pids(d: Daemon) -> set[int]:
    """Return the pids of the master's ACTIVE workers, from its status file (forked workers are
    the template's children, not the master's)."""
    st = d.status()
    assert st is not None and st["pid"] == d.pid
    return {w["pid"] for g in st["generations"] if g["state"] == "ACTIVE" for w in g["workers"] if w["pid"]}


def family(d: Daemon) -> set[int]:
    """Return every process of this master: its children and theirs (templates fork the workers)."""
    out = set()
    todo = [d.pid]
    while todo:
        for pid in children(todo.pop()):
            if pid not in out:
                out.add(pid)
                todo.append(pid)
    return out


def sigkill(d: Daemon) -> set[int]:
    """SIGKILL the master once its workers are listed; return them and its other processes."""
    d.wait_log(r"serving: generation 1 ACTIVE")
    wait_until(lambda: d.status() is not None and len(serving_pids(d)) == 2, 10, "2 workers in the status file")
    pids = serving_pids(d) | family(d)
    d.send(signal.SIGKILL)
    assert d.proc is not None
    d.proc.wait(10)
    return pids


@needs_root
def test_ten_restarts_of_a_prefork_master_take_over_every_orphan_and_stop_leaves_none(tmp_path):
    port = free_port()
    cfg = echo_config(port, count=2, workers={"count": 2, "app": "echo", "prefork": True, "warm": True},
                      drain={"timeout": "3s", "orphan_grace": "60s"})
    seen: set[int] = set()
    d = Daemon(tmp_path, cfg).start()
    try:
        for _ in range(CYCLES):
            old = sigkill(d)
            seen |= old
            orphans = {p for p in old if alive(p)}
            d = Daemon(tmp_path, cfg).start()
            took = d.wait_log(r"took over (\d+) orphaned worker\(s\) of dead master")[0]
            assert int(took.group(1)) >= 2, d.log()
            assert "not taken over" not in d.log(), d.log()
            d.wait_log(r"the orphaned workers have exited")
            assert not [p for p in orphans if alive(p)], d.log()
        # The last restart: an orphan still has a keep-alive client when `stop` comes.
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        client.sendall(b"ping")
        assert client.recv(10) == b"ping"
        old = sigkill(d)
        seen |= old
        d = Daemon(tmp_path, cfg).start(wait=False)
        d.wait_log(r"took over \d+ orphaned worker\(s\)")
        # `stop` finds the master by its pidfile, written once it serves; the orphan with the
        # client is then still draining (an echo stream never ends by itself: drain.timeout).
        wait_until(lambda: (text_of(d.pidfile) or "").strip() == str(d.pid), 20, "the new master's pidfile")
        seen |= family(d)
        assert any(alive(p) for p in old), "the orphans were gone before `stop`: nothing tested"
        r = subprocess.run([sys.executable, "-m", "upgraderd", "stop", "--pidfile", str(d.pidfile)],
                           capture_output=True, text=True, cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout + r.stderr
        assert d.proc is not None and d.proc.wait(30) == 0
        client.close()
        left = [p for p in seen if alive(p)]
        assert left == [], (left, d.log())
    finally:
        d.stop()
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
