"""TTIN / TTOU: one worker more or fewer in the ACTIVE generation, under load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.scenarios import scaling
from tests.support.upgraderd_proc import Daemon, echo_config, free_port

pytestmark = pytest.mark.e2e

# Read here, not through upgraderd's own reader: that reader is part of what is tested.


def test_ttin_ttou_shared_mode_drops_nothing(tmp_path):
    out = scaling.run(tmp_path, "shared")
    assert out["failures"] == {}, out
    assert out["warned"] is False  # a shared socket is never closed by TTOU


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) to create a network namespace")
@pytest.mark.parametrize("migrate_req", [1, 0])
def test_ttin_ttou_reuseport_drops_nothing_with_or_without_tcp_migrate_req(tmp_path, migrate_req):
    # Retiring a SO_REUSEPORT slot closes its socket. Without tcp_migrate_req the kernel
    # would reset what is queued there, so the master first steers new connections away
    # from the slot and closes its socket only once its worker, which accepts until
    # EAGAIN, is gone. The setting is per network namespace, so the scenario runs in a
    # fresh one and the host's value is never touched.
    script = (f"ip link set lo up && sysctl -q -w net.ipv4.tcp_migrate_req={migrate_req} && "
              f"exec {sys.executable} -m tests.support.scenarios.scaling reuseport {tmp_path}")
    proc = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True,
                          timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["failures"] == {}, out
    assert out["ok"] > 500
    assert out["warned"] is False


def test_ttou_in_reuseport_mode_closes_the_slot_socket_without_risk(tmp_path):
    with Daemon(tmp_path, echo_config(free_port(), mode="reuseport", count=2)).start() as d:
        d.send(signal.SIGTTOU)
        d.wait_log(r"generation 1 slot 1: retired")
        d.wait_log(r"closed listener 127\.0\.0\.1:\d+ \(reuseport, slot 1\)")
        # Steered away before its worker drained, the socket held nothing at its close.
        assert "reuseport slot socket(s): net.ipv4.tcp_migrate_req is not 1" not in d.log()
