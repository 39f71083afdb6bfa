"""The worker contract, as a worker sees it: fds, LISTEN_PID, names, addresses, placeholders."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest

from tests.support import ROOT
from tests.support.upgraderd_proc import Daemon, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e

FIXTURE = str(ROOT / "tests" / "fixtures" / "contract_worker.py")


def test_worker_gets_fds_names_addresses_and_expanded_argv(tmp_path):
    web, api, pub = free_port(), free_port(), free_port()
    out = tmp_path / "out"
    out.mkdir()
    cfg = {
        "listeners": [
            {"name": "web", "port": web},
            {"name": "pub-1", "port": pub, "mode": "worker-bind"},
            {"name": "api", "port": api, "mode": "shared"},
        ],
        "workers": {"count": 2, "env": {"OUT_DIR": str(out)}, "cwd": str(out),
                    "command": [sys.executable, FIXTURE, "--web={fd:web}", "--api={fd:api}",
                                "--pub={addr:pub-1}", "{host:api}:{port:api}", "slot={slot}",
                                "gen={generation}", "{{literal}}"]},
        "ready": {"mode": "delay", "after": "300ms", "timeout": "10s"},
        "drain": {"timeout": "10s"},
    }
    with Daemon(tmp_path, cfg).start() as d:
        pids = d.workers()
        wait_until(lambda: len(list(out.glob("*.json"))) == 2, 10, "both workers to report")
        seen = {json.loads(p.read_text())["pid"]: json.loads(p.read_text()) for p in out.glob("*.json")}
        assert set(seen) == pids
        for pid, info in seen.items():
            env = info["env"]
            slot = env["UPGRADERD_SLOT"]
            # The systemd protocol: LISTEN_PID is the worker's own pid, fds start at 3 in
            # listener order, worker-bind listeners are not passed.
            assert env["LISTEN_PID"] == str(pid)
            assert env["LISTEN_FDS"] == "2"
            assert env["LISTEN_FDNAMES"] == "web:api"
            assert info["fds"] == {"3": {"addr": ["127.0.0.1", web], "listening": True},
                                   "4": {"addr": ["127.0.0.1", api], "listening": True}}
            assert env["NOTIFY_SOCKET"].startswith("@upgraderd-")
            assert env["UPGRADERD_GENERATION"] == "1" and slot in ("0", "1")
            assert env["UPGRADERD_DRAIN_SIGNAL"] == "TERM"
            assert env["UPGRADERD_ADDR_WEB"] == f"127.0.0.1:{web}"
            assert env["UPGRADERD_ADDR_PUB_1"] == f"127.0.0.1:{pub}"
            assert env["UPGRADERD_WORKER_BIND"] == "pub-1"
            assert "UPGRADERD_PROBE_PORT" not in env
            assert info["cwd"] == str(out)
            assert info["argv"] == ["--web=3", "--api=4", f"--pub=127.0.0.1:{pub}",
                                    f"127.0.0.1:{api}", f"slot={slot}", "gen=1", "{literal}"]
        assert sorted(info["env"]["UPGRADERD_SLOT"] for info in seen.values()) == ["0", "1"]


def test_builtin_app_binds_a_worker_bind_listener_and_master_warns_at_start_up(tmp_path):
    port = free_port()
    cfg = echo_config(port, mode="worker-bind", count=2)
    with Daemon(tmp_path, cfg).start() as d:
        for i in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"hello %d" % i)
                assert s.recv(64) == b"hello %d" % i
        # Each worker holds its own SO_REUSEPORT socket on the address; the master holds none.
        assert _listeners_on(port, d.pid) == 0
        assert all(_listeners_on(port, pid) == 1 for pid in d.workers())
        value = int(open("/proc/sys/net/ipv4/tcp_migrate_req").read())
        warning = ("WARNING net.ipv4.tcp_migrate_req=0: draining the worker-bind listener(s) echo "
                   "can reset connections still queued on them. Fix: set `kernel.tcp_migrate_req: set`")
        assert (warning in d.log()) is (value == 0)


def _listeners_on(port: int, pid: int) -> int:
    """Return how many listening TCP sockets on `port` process `pid` holds."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            held += 1
    return held
