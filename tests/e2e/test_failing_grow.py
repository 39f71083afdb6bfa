"""Failing grows in reuseport mode at net.ipv4.tcp_migrate_req=0 lose nothing once the master steers.

The scenario runs the daemon in a network namespace of its own (the setting
is per namespace; the host's is never touched). Until `ListenerSet.steer()`
is called from the master loop, the new slots' sockets take connections
before their generation is ready, and closing them resets those: the test is
then an expected failure, strict, so wiring steering in turns it into a pass
that must have its marker removed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
                       reason="needs root, unshare and ip to create a network namespace"),
]


def test_failing_grows_at_migrate_req_0_reset_nothing(tmp_path):
    env = {**os.environ, "HOST_NETNS": os.readlink("/proc/self/ns/net")}
    proc = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.support.scenarios.failing_grow",
                           str(tmp_path), "3"], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ok"] > 100
    assert out["failures"] == {}
