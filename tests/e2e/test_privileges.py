"""A master started as root binds a port below 1024 and runs its workers as workers.user/group."""

from __future__ import annotations

import os
import pwd
import random
import signal
import socket
import subprocess
import sys

import pytest

from tests.support import ROOT
from tests.support.loadgen import Load
from tests.support.upgraderd_proc import Daemon, echo_config, wait_until
from upgraderd.system.process import SHIM, privilege_argv

PLAIN_ECHO = str(ROOT / "tests" / "fixtures" / "plain_echo.py")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="binding a port < 1024 and switching user need root"),
]


def free_low_port() -> int:
    """Return a privileged TCP port on 127.0.0.1 that is free right now."""
    for port in random.sample(range(600, 1024), 424):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")


def ids(pid: int) -> tuple[list[int], list[int], list[int]]:
    """Return the (real, effective, saved, fs) uids, gids and supplementary groups of `pid`."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = [int(x) for x in value.split()] if key in ("Uid", "Gid", "Groups") else []
    return fields["Uid"], fields["Gid"], fields["Groups"]


def interpreter_for(user: str) -> str:
    """Return a Python that `user` can run through upgraderd's own spawn path, or skip."""
    tried = []
    for python in (sys.executable, "/usr/bin/python3"):
        argv = [*privilege_argv(user, None), *SHIM, python, "-c", "import selectors"]
        probe = subprocess.run(argv, capture_output=True, text=True, cwd="/")
        if probe.returncode == 0:
            return python
        tried.append(f"{python}: {probe.stderr.strip()[-200:]}")
    pytest.skip(f"no Python that {user} can run: {'; '.join(tried)}")


def test_workers_run_as_nobody_on_port_below_1024(tmp_path):
    nobody = pwd.getpwnam("nobody")
    python = interpreter_for("nobody")
    port = free_low_port()
    cfg = echo_config(port, count=2)
    cfg["workers"] = {"count": 2, "command": [python, PLAIN_ECHO], "user": "nobody"}
    with Daemon(tmp_path, cfg).start() as d:
        assert ids(d.pid)[0] == [0, 0, 0, 0]
        for pid in d.workers():
            uid, gid, groups = ids(pid)
            assert uid == [nobody.pw_uid] * 4 and gid == [nobody.pw_gid] * 4, (pid, uid, gid)
            assert 0 not in groups
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            assert f"HOME={nobody.pw_dir}".encode() in env and b"USER=nobody" in env
        load = Load("127.0.0.1", port, threads=4, max_seconds=60).start("echo")
        assert load.wait_for_ok(100)
        # A reload keeps the master root and the workers nobody; a new low port can still be bound.
        port2 = free_low_port()
        cfg["listeners"].append({"name": "second", "host": "127.0.0.1", "port": port2})
        d.write_config(cfg)
        gen1 = d.workers()
        d.send(signal.SIGHUP)
        d.wait_log(r"reload done: generation 2 ACTIVE")
        wait_until(lambda: not (d.workers() & gen1), 15, "generation 1 to exit")
        assert all(ids(pid)[0] == [nobody.pw_uid] * 4 for pid in d.workers())
        with socket.create_connection(("127.0.0.1", port2), timeout=5) as s:
            s.sendall(b"low")
            assert s.recv(3) == b"low"
        assert load.wait_for_ok(load.result.ok + 100)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)


def test_group_only_keeps_the_user(tmp_path):
    port = free_low_port()
    cfg = echo_config(port, count=1)
    cfg["workers"] = {"count": 1, "app": "echo", "group": "nogroup"}
    with Daemon(tmp_path, cfg).start() as d:
        (pid,) = d.workers()
        uid, gid, groups = ids(pid)
        assert uid == [0] * 4 and gid == [65534] * 4 and groups == []
