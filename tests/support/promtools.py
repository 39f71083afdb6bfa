"""Find Debian's prometheus and promtool for the tests, installing them if missing.

scripts/test installs them (scripts/test-deps). A test run any other way
installs them here when it runs as root; otherwise the tests that need them
skip, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.support import ROOT


def tool(name: str) -> str:
    """Return the path of `name` (prometheus or promtool), or skip the test."""
    path = shutil.which(name)
    if path is None and os.geteuid() == 0:
        subprocess.run([str(ROOT / "scripts" / "test-deps")], check=True, timeout=600)
        path = shutil.which(name)
        assert path is not None, f"scripts/test-deps ran but {name} is still missing"
    if path is None:
        pytest.skip(f"{name} is not installed and installing Debian's prometheus package needs root")
    return path
