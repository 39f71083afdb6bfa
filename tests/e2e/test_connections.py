"""A small sample of bench/connections.py: persistent connections moved across HUPs, 0 lost.

The benchmark holds 50,000 connections; this runs the same code with 600
(two client processes, 4 workers of the shipped config, 2 HUPs), so the
bench cannot rot and the hand-off of many connections per worker stays
covered in CI.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.e2e


def test_600_persistent_connections_survive_2_hups():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.connections", "--connections", "600", "--clients", "2",
         "--workers", "4", "--hups", "2", "--pause", "0.2", "--max-seconds", "120"],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert "600 of 600 connected" in out
    assert "connections held to the end: 600 of 600;" in out and out.rstrip().endswith("failures: 0")
    rows = re.findall(r"^\s+(\d) +\d+ ms +([0-9.]+) s +[0-9.]+ MB +[0-9 /]+ ms +(\d+) of (\d+)$", out, re.M)
    assert [r[0] for r in rows] == ["1", "2"], out   # each HUP's old generation retired
    assert [r[2:] for r in rows] == [("600", "600")] * 2, out   # and handed every connection it held
