"""Workers log to the master's stderr at once: each line must reach the file whole.

The README's terminal test once found `...in 6 ms2026-12-07T... handed 3` followed by an
empty line in the log: two workers' `print` calls, each a write of the line and then a write
of its newline (stderr to a file is unbuffered), interleaved on the shared file.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

WRITER = """
import sys
from upgraderd.apps import logline
for i in range(int(sys.argv[1])):
    logline.log(f"worker {sys.argv[2]} line {i} " + "x" * 80)
"""


def test_lines_from_processes_logging_at_once_are_never_interleaved(tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    with log.open("w") as f:   # one open file description, shared, as `2>file` gives the master's children
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, "3000", str(n)], stderr=f) for n in range(4)]
        for p in procs:
            assert p.wait(timeout=120) == 0
    lines = log.read_text().splitlines()
    shape = re.compile(r"\d{4}-\d\d-\d\dT\S+ upgraderd\[\d+\] INFO worker \d line \d+ x{80}")
    assert [line for line in lines if not shape.fullmatch(line)] == []
    assert len(lines) == 4 * 3000
