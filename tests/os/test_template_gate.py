"""A batch's workers wait at one gate, and none of them holds its write end (apps/template.py).

The template forks a batch, sends each worker's SPAWNED, then opens the gate.
Here the master's notify socket is full, so the template blocks on the first
SPAWNED with its workers forked and waiting; it is then killed (a crash, an
OOM kill). Every worker must see the gate's end and exit, not wait forever:
no worker may hold the write end. Another batch, with room to notify, is
released and serves, and its workers hold none of the other workers' fds.
"""

from __future__ import annotations

import array
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.upgraderd_proc import wait_until

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(autouse=True)
def subreaper():
    """Workers re-parent to us when their middle exits, so we can find and reap them."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def start_template(control: socket.socket) -> subprocess.Popen[bytes]:
    # Its channel at fd 3: dup'ed there before the child's fds are closed, and kept (pass_fds).
    return subprocess.Popen([sys.executable, "-m", "upgraderd.apps.template", "echo"], cwd=ROOT,
                            pass_fds=(3,), stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: os.dup2(control.fileno(), 3),
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def ask(channel: socket.socket, slot: int, env: dict[str, str], fds: list[int]) -> None:
    channel.sendmsg([json.dumps({"slot": slot, "env": env}).encode()],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])


def my_children() -> set[int]:
    """Our children forked by a template (their name is the template's until released)."""
    me = os.getpid()
    kids = set()
    for pid in Path(f"/proc/{me}/task/{me}/children").read_text().split():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "upgraderd-tmpl":
                kids.add(int(pid))
        except OSError:
            pass
    return kids


def reap(pids: set[int], timeout: float) -> dict[int, int]:
    """Wait for every pid in `pids` to exit; return their exit codes."""
    codes: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while set(codes) != pids and time.monotonic() < deadline:
        for pid in pids - set(codes):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    for pid in pids - set(codes):   # still there: a failure, but never left running
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return codes


def full_notify_socket(path: Path) -> socket.socket:
    """A datagram socket at `path` that nobody reads, filled until a sender would block."""
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect(str(path))
        try:
            while True:
                s.send(b"x")
        except BlockingIOError:
            pass
    return sink


def test_workers_of_a_template_killed_before_their_gate_opens_exit_on_their_own(tmp_path):
    sink = full_notify_socket(tmp_path / "notify")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(4)]
    template = start_template(theirs)
    theirs.close()
    try:
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "PATH": os.environ["PATH"]}
        for slot, lsock in enumerate(listeners):
            ask(ours, slot, env, [lsock.fileno()])
        # The middle forks four workers and exits: they re-parent to us. The template is stuck
        # in its first SPAWNED, before the gate.
        workers = wait_until(lambda: (my_children() - {template.pid}) if len(my_children() - {template.pid}) == 4
                             else None, 20, "four workers forked")
        assert template.poll() is None
        template.kill()
        template.wait(10)
        codes = reap(workers, 10)
    finally:
        if template.poll() is None:
            template.kill()
            template.wait(10)
        ours.close()
        sink.close()
        for lsock in listeners:
            lsock.close()
    assert codes == dict.fromkeys(workers, 1), codes   # all four gone, none released


def test_a_released_batch_serves_and_each_worker_holds_only_its_own_listener(tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    template = start_template(theirs)
    theirs.close()
    workers: set[int] = set()
    try:
        for slot, lsock in enumerate(listeners):
            env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "PATH": os.environ["PATH"],
                   "LISTEN_FDS": "1", "LISTEN_FDNAMES": "echo"}
            ask(ours, slot, env, [lsock.fileno()])
        notify.settimeout(20)
        said = sorted(notify.recv(256).decode() for _ in range(6))   # SPAWNED x3, then READY x3
        spawned = [m for m in said if m.startswith("SPAWNED=")]
        assert sorted(m.partition(":")[0] for m in spawned) == ["SPAWNED=0", "SPAWNED=1", "SPAWNED=2"], said
        workers = {int(m.rpartition(":")[2]) for m in spawned}
        assert sum(m.startswith("READY=1") for m in said) == 3, said
        for slot, lsock in enumerate(listeners):
            with socket.create_connection(lsock.getsockname(), timeout=5) as c:
                c.sendall(b"slot %d\n" % slot)
                assert c.recv(64) == b"slot %d\n" % slot
            inode = os.fstat(lsock.fileno()).st_ino
            holders = [pid for pid in workers
                       if any(os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]"
                              for fd in os.listdir(f"/proc/{pid}/fd"))]
            assert len(holders) == 1, (slot, holders)   # its own worker, no sibling
    finally:
        template.kill()
        template.wait(10)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        reap(workers, 10)
        ours.close()
        notify.close()
        for lsock in listeners:
            lsock.close()
