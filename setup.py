"""Ship the checkout's config/ folder inside the wheel as `upgraderd/defaults/`, and deploy/'s
systemd units, completions, logrotate and sysctl files as `upgraderd/defaults/deploy/`.

Everything else is in pyproject.toml. config/ stays where operators and tests
expect it in a checkout (scripts/run serves config/upgraderd.yaml); only the
built package gets a copy, which `upgraderd init` and the example configs use
(upgraderd/service/defaults.py finds either).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
DEPLOY = ("systemd", "completions", "logrotate", "sysctl.d")


class BuildWithDefaults(build_py):
    """build_py, plus config/ copied to upgraderd/defaults/ in the build tree."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "upgraderd" / "defaults"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(HERE / "config", target,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules"))
        # What an installed (not checked-out) operator needs of deploy/: the systemd units,
        # shell completions, logrotate and sysctl files (README, "Install").
        for part in DEPLOY:
            shutil.copytree(HERE / "deploy" / part, target / "deploy" / part)


setup(cmdclass={"build_py": BuildWithDefaults})
