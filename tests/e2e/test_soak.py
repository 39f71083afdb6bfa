"""A small sample of bench/soak.py: reloads under load lose nothing and leak nothing."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT


def test_ten_reloads_under_load_lose_nothing_and_leak_no_fd_or_thread():
    # The long run's shape (prefork, no standby, each reload waited for until the old generation
    # retired), at 10 reloads: a few seconds on a quiet machine (about 0.3 s of the daemon's CPU each).
    proc = subprocess.run([sys.executable, "-m", "bench.soak", "--reloads", "10", "--every", "5",
                           "--persistent", "8", "--prefork", "--cold", "--threads", "2"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "failures: 0" in proc.stdout
    # A hand-off at every reload: each of the 8 held connections moved 10 times (80; the load's
    # own connections caught in flight move too), none lost, no worker killed at its deadline.
    line = next(x for x in proc.stdout.splitlines() if x.startswith("persistent: 8 connections"))
    assert "failures: 0, same ports: True" in line and "drain timeouts: 0" in line, line
    assert int(line.split("handed off: ")[1].split()[0]) >= 80, line
    # ... and each of the 10 old generations logged connections handed over before it retired.
    line = next(x for x in proc.stdout.splitlines() if x.startswith("hand-offs logged:"))
    assert "over 10 old generations" in line and line.endswith("reloads without a hand-off: 0"), line
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == [1, 5, 10]
