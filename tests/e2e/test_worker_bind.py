"""worker-bind mode: each worker binds its own SO_REUSEPORT socket; reloads under load.

Whether a reload drops anything depends on net.ipv4.tcp_migrate_req, which is
per network namespace. Each test therefore runs the scenario
(tests/support/netns_scenario.py: the worker-bind example, 10 HUPs under
connection-per-request load) in a network namespace it creates with
`unshare -n`, and checks that the host's own setting did not change.

With tcp_migrate_req=1 a rare reset remains possible: a handshake completing
while its listener closes is not moved by the kernel, and no TcpExt counter
shows it (measured by bench/migrate_req_race.py; docs/operations.md, "Kernel
setting tcp_migrate_req"). Its odds grow with the closes and the connection
rate, so the zero-drop test does 10 reloads (20 before: twice the time and
twice the odds of that kernel race, for no other check). With 0, 20 reloads
reset ~50 connections, so 10 still show the hazard every time.
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

MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"
RELOADS = 10


def run_in_netns(workdir, initial: int, policy: str) -> dict[str, object]:
    """Run the scenario in a new network namespace; return what it saw."""
    host_before = open(MIGRATE_REQ).read()
    env = {**os.environ, "HOST_NETNS": os.readlink("/proc/self/ns/net")}
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "tests.support.netns_scenario",
         str(workdir), str(initial), policy, str(RELOADS)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert open(MIGRATE_REQ).read() == host_before, "the host's tcp_migrate_req changed"
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_worker_bind_zero_drop_when_master_sets_tcp_migrate_req(tmp_path):
    seen = run_in_netns(tmp_path, initial=0, policy="set")
    assert seen["set_logged"] and seen["final"] == 1
    assert not seen["warned"]
    assert seen["risk_metric"] == 0 and seen["migrate_req_metric"] == 1
    assert seen["failures"] == {}, seen
    assert seen["reloads"] == RELOADS
    assert seen["stale"] == 0 and seen["fresh_min"] > 0
    assert seen["servers"] == ["reuseport"]
    print(f"\nworker-bind, tcp_migrate_req=1: {seen['ok']} requests, {RELOADS} reloads, 0 failed")


def test_tcp_migrate_req_0_resets_queued_connections_and_is_warned(tmp_path):
    seen = run_in_netns(tmp_path, initial=0, policy="check")
    assert seen["final"] == 0 and not seen["set_logged"]
    assert seen["warned"]
    assert seen["risk_metric"] == 1 and seen["migrate_req_metric"] == 0
    # The hazard the warning names: old workers close their listeners, and the
    # connections queued on them are reset. Nothing else goes wrong.
    assert set(seen["failures"]) == {"reset"}, seen
    assert seen["stale"] == 0 and seen["reloads"] == RELOADS
    print(f"\nworker-bind, tcp_migrate_req=0: {seen['failures']['reset']} resets in {RELOADS} reloads "
          f"({seen['ok']} requests)")
