"""A forked worker's environment becomes exactly the one the master sent (apps/template.py
`become_environ`), in os.environ and in what an exec'd child inherits, even where code in the
template changed the process's environment behind os.environ's back."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import os, subprocess, sys
from upgraderd.apps.template import become_environ
os.environ["STALE"] = "1"
os.environ["KEPT"] = "old"
os.environ["TZ"] = "Europe/Paris"
os.putenv("TZ", "UTC")          # changed under os.environ (an app at import, a C library's setenv)
os.unsetenv("SAME")             # os.environ still shows SAME=s
become_environ({"KEPT": "new", "ADDED": "x=y", "PATH": os.environ["PATH"], "SAME": "s", "TZ": "Europe/Paris"})
print(repr(sorted(os.environ.items())))
print(repr(sorted(line.partition("=")[::2] for line in
      subprocess.run(["/usr/bin/env"], capture_output=True, text=True, check=True).stdout.splitlines())))
"""


def test_the_environment_becomes_exactly_the_one_sent_in_python_and_for_a_child():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "SAME": "s", "GONE": "g", "PYTHONPATH": "."}).stdout
    py, child = out.splitlines()
    want = [("ADDED", "x=y"), ("KEPT", "new"), ("PATH", "/usr/bin:/bin"), ("SAME", "s"), ("TZ", "Europe/Paris")]
    assert eval(py) == want
    assert eval(child) == [tuple(kv) for kv in want]
