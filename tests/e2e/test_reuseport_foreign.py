"""The reuseport group is the master's alone, or it says so (issue 25, finding 4).

A process of the same uid can join the master's SO_REUSEPORT group and take
a share of new connections that nobody serves (it never accepts). The old
master started next to one bound first and answered /readyz 200 while 0 of
40 connections were served with 1 worker. Now the start is refused (exit 3,
naming the pid), a reload with one that joined later is refused (exit 1,
naming it), and sockets passed with another process's LISTEN_PID are closed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support.upgraderd_proc import ROOT, Daemon, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e

FOREIGN = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(64)
print("listening", flush=True)
time.sleep(60)  # never accepts: what the kernel queues here hangs
"""


@pytest.fixture
def foreign() -> Iterator[callable]:  # type: ignore[valid-type]
    started: list[subprocess.Popen[str]] = []

    def start(port: int) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-c", FOREIGN, str(port)], stdout=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL)
        started.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "listening"
        return p
    yield start
    for p in started:
        p.kill()
        p.wait()


def served(port: int, n: int) -> int:
    """Return how many of `n` fresh connections get their echo within 2 s."""
    ok = 0
    for i in range(n):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                c.sendall(b"x%d" % i)
                ok += c.recv(16) == b"x%d" % i
        except OSError:
            pass
    return ok


def test_a_foreign_listener_bound_first_refuses_the_start_naming_its_pid(tmp_path, foreign):
    port = free_port()
    f = foreign(port)
    d = Daemon(tmp_path, echo_config(port, count=2))
    try:
        d.start(wait=False)
        assert d.proc is not None
        try:
            code = d.proc.wait(20)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 3, (code, d.log())
        assert f"pid {f.pid}" in d.log() and f"127.0.0.1:{port}" in d.log(), d.log()
    finally:
        d.stop()


def test_a_foreign_listener_that_joins_later_refuses_the_reload_naming_it(tmp_path, foreign):
    port = free_port()
    with Daemon(tmp_path, echo_config(port, count=2)).start() as d:
        f = foreign(port)
        r = subprocess.run([sys.executable, "-m", "upgraderd", "reload", "--pidfile", str(d.pidfile)],
                           capture_output=True, text=True, cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 1, r.stdout + r.stderr + d.log()
        assert f"pid {f.pid}" in r.stdout + r.stderr, r.stdout + r.stderr
        # Steered to the master's own sockets: the stranger, appended last, gets nothing.
        assert served(port, 40) == 40


def test_sockets_passed_with_another_pid_are_closed(tmp_path):
    port = free_port()
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind(("127.0.0.1", port))
    held.listen(64)
    os.set_inheritable(held.fileno(), True)
    # The wrap puts our socket at fd 3 and says it is for some other pid (1).
    code = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
            "os.environ.update(LISTEN_FDS='1', LISTEN_PID='1', LISTEN_FDNAMES='echo'); "
            "os.execv(sys.argv[2], sys.argv[2:])")
    wrap = (sys.executable, "-c", code, str(held.fileno()))
    d = Daemon(tmp_path, echo_config(port, count=2), wrap=wrap, pass_fds=(held.fileno(),))
    try:
        d.start(wait=False)
        held.close()  # ours is gone at once: only the master can still hold that socket
        d.wait_log(r"serving: generation 1 ACTIVE")
        assert served(port, 40) == 40
        wait_until(lambda: "LISTEN_PID" in d.log(), 5, "the log to name the wrong LISTEN_PID")
    finally:
        d.stop()
        held.close()


def test_steering_never_guesses_positions_a_stranger_shifted(tmp_path, foreign):
    port = free_port()
    with Daemon(tmp_path, echo_config(port, count=3)).start() as d:
        foreign(port)  # joins last: the program, built before, still names only the master's positions
        assert served(port, 20) == 20
        # Retiring slot 2 closes a socket: the kernel moves the group's last member (the
        # stranger) into its place. The master counts the group first and stops steering.
        d.send(signal.SIGTTOU)
        d.wait_log(r"4 sockets listen in the group and this master holds 3 \(a stranger joined it\): not steered")


def test_a_foreign_listener_between_reloads_is_reported_by_readyz_and_the_metric_until_it_leaves(tmp_path, foreign):
    from tests.support.scrape import fetch, metrics_url, scrape, value
    port = free_port()
    cfg = echo_config(port, count=2)
    readyz = metrics_url(cfg, "/readyz")
    with Daemon(tmp_path, cfg).start() as d:
        assert fetch(readyz)[0] == 200
        assert value(scrape(cfg), "upgraderd_reuseport_foreign_listeners") == 0
        f = foreign(port)  # no reload: only the master's periodic check can see it

        def reported() -> str | None:
            code, body, _ = fetch(readyz)
            return body if code == 503 and f"pid {f.pid}" in body else None
        body = wait_until(reported, 15, "/readyz to name the stranger")
        assert f"127.0.0.1:{port}" in str(body), body
        assert value(scrape(cfg), "upgraderd_reuseport_foreign_listeners") == 1
        d.wait_log(rf"port group shared: pid {f.pid} ")
        f.kill()
        f.wait()
        wait_until(lambda: fetch(readyz)[0] == 200, 15, "/readyz to answer 200 once the stranger left")
        assert value(scrape(cfg), "upgraderd_reuseport_foreign_listeners") == 0
        d.wait_log(r"port group: no stranger listens on this master's addresses any more")
