"""The worker contract, as a worker sees it: fds, LISTEN_PID, names, addresses, placeholders."""

from __future__ import annotations

import json
import sys

import pytest

from daemon import ROOT, Daemon, free_port, wait_until

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
