"""A crash-looping reuseport slot loses no client connection; with nothing READY, /readyz is 503.

The first test runs the daemon in a network namespace of its own
(tests/support/scenarios/crashloop.py) with net.ipv4.tcp_migrate_req=0, so
that closing the FATAL slot's socket resets whatever is still queued on it;
the host's setting is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support import ROOT
from tests.support.scenarios.crashloop import CRASH_LOOP, config
from tests.support.scrape import fetch, metrics_url
from tests.support.upgraderd_proc import Daemon, free_port, wait_until

pytestmark = pytest.mark.e2e

NETNS = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
                           reason="needs root, unshare and ip to create a network namespace")


@NETNS
def test_a_crash_looping_slot_at_migrate_req_0_loses_no_connection(tmp_path):
    env = {**os.environ, "HOST_NETNS": os.readlink("/proc/self/ns/net")}
    proc = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.support.scenarios.crashloop",
                           str(tmp_path)], capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["crashes"] == CRASH_LOOP - 1 and out["fatal"], out
    assert out["readyz_while_looping"] == [200, "ok: generation 1 active\n"]
    assert out["ok"] > 400
    # The path under test ran: connections did queue on the dead slot, and the master took them.
    assert out["rescued"] > 0, out
    # Timeouts included: a connection left in the slot's queue would end as one.
    assert out["failures"] == {}, out


def test_readyz_is_503_while_no_worker_is_ready(tmp_path):
    port = free_port()
    flag = tmp_path / "crash"
    cfg = config(port, flag, "all", count=2)
    with Daemon(tmp_path, cfg).start() as d:
        assert fetch(metrics_url(cfg, "/readyz"))[:2] == (200, "ok: generation 1 active\n")
        flag.touch()
        d.wait_log(r"generation 1 slot 0: crash loop", timeout=60)
        d.wait_log(r"generation 1 slot 1: crash loop", timeout=60)
        # Both slots are FATAL: the generation is still the ACTIVE one, but nothing serves.
        assert fetch(metrics_url(cfg, "/readyz"))[:2] == (503, "not ok: no READY worker in generation 1\n")
        assert fetch(metrics_url(cfg, "/healthz"))[0] == 200

        def states() -> list[str]:
            status = d.status() or {"generations": []}
            return [w["state"] for g in status["generations"] for w in g["workers"]]

        wait_until(lambda: states() == ["FATAL", "FATAL"], 10, "the status file to show both slots FATAL")
        wait_until(lambda: d.workers() == set(), 10, "no worker process left")
