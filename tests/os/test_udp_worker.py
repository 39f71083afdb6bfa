"""The built-in echo worker on a UDP socket it inherits, without a master.

The test plays the master: it binds the slot socket, starts the worker with
the socket at fd 3 (LISTEN_FDS) and a notify socket, and drains it with
SIGTERM. What is queued on the socket when the drain signal arrives is
answered, and the test's own copy of the socket is whole afterwards.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from upgraderd.config.schema import ListenerSpec
from upgraderd.system import udp

QUEUED = 100


def start_worker(tmp_path: Path, sock: socket.socket, notify: socket.socket,
                 env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fixtures" / "listen_exec.py"), str(sock.fileno()), "dns", "--",
         sys.executable, "-m", "upgraderd.apps.echo"],
        env={**os.environ, "NOTIFY_SOCKET": notify.getsockname(), **(env or {})},
        pass_fds=(sock.fileno(),), cwd=ROOT, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("threads", ["1", "3"])
def test_a_draining_worker_answers_what_is_queued_and_leaves_the_socket_whole(tmp_path, threads):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    master = udp.bind(ListenerSpec(name="dns", port=port, protocol="udp"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(10)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(10)
    w = start_worker(tmp_path, master, notify, {"UPGRADERD_THREADS": threads})
    try:
        assert notify.recv(4096).startswith(b"READY=1")
        client.sendto(b"first", ("127.0.0.1", port))
        assert client.recv(100) == b"first"
        os.kill(w.pid, signal.SIGSTOP)
        for i in range(QUEUED):
            client.sendto(b"q%03d" % i, ("127.0.0.1", port))
        os.kill(w.pid, signal.SIGTERM)   # delivered at SIGCONT: the queue is there when it drains
        os.kill(w.pid, signal.SIGCONT)
        assert w.wait(10) == 0
        answers = sorted(client.recv(100) for _ in range(QUEUED))
        assert answers == [b"q%03d" % i for i in range(QUEUED)]
        # The worker closed only its own fd: the master's socket still receives, and
        # poll() does not report it readable with nothing queued (no shutdown()).
        assert select.select([master], [], [], 0)[0] == []
        client.sendto(b"after", ("127.0.0.1", port))
        master.settimeout(5)
        assert master.recv(100) == b"after"
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
        for s in (master, notify, client):
            s.close()
