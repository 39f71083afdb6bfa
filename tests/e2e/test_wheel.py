"""The wheel, installed in a fresh venv outside the checkout, is a working upgraderd.

Slow (about 20-40 s): it builds the wheel and installs it with its dependencies
through pip's configured index.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.upgraderd_proc import ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Build the wheel, install it into a new venv; return (venv, wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp),
                            str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next(tmp.glob("upgraderd-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr
    return venv, wheel


def _run(venv: Path, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "UPGRADERD_CONFIG")}
    return subprocess.run([str(venv / "bin" / "upgraderd"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60, env={**clean, **(env or {})}, stdin=subprocess.DEVNULL)


def test_wheel_contents(installed):
    _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"upgraderd/defaults/{p.relative_to(ROOT / 'config')}" for p in (ROOT / "config").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert shipped and shipped <= names
    # The operator's files of deploy/, for installed users (README, "Install").
    deploy = {f"upgraderd/defaults/deploy/{p.relative_to(ROOT / 'deploy')}"
              for part in ("systemd", "completions", "logrotate", "sysctl.d")
              for p in (ROOT / "deploy" / part).rglob("*") if p.is_file()}
    assert "upgraderd/defaults/deploy/systemd/upgraderd.service" in deploy and deploy <= names, \
        sorted(deploy - names)
    assert "upgraderd/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    meta = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "Classifier: License :: OSI Approved :: MIT License" in meta
    assert "Classifier: Typing :: Typed" in meta
    # No upper bound: only prometheus-client's public API is used (tests/unit/test_package_metadata.py).
    assert "Requires-Dist: prometheus-client>=0.20\n" in meta
    assert "upgraderd/contract/metricformat.py" in names


def test_installed_upgraderd_checks_its_shipped_config_and_finds_none_by_default(installed, tmp_path):
    venv, _ = installed
    site = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import upgraderd, os; print(os.path.dirname(upgraderd.__file__))"],
                          capture_output=True, text=True, cwd=tmp_path, check=True).stdout.strip()
    assert not site.startswith(str(ROOT)), site  # the installed copy, not the checkout
    shipped = Path(site) / "defaults" / "upgraderd.yaml"
    r = _run(venv, "check", "-c", str(shipped), cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, f"{shipped}: ok (1 listener(s), 4 worker(s))\n"), r
    if not os.path.exists("/etc/upgraderd/upgraderd.yaml"):
        r = _run(venv, "check", cwd=tmp_path)
        assert (r.returncode, r.stdout) == (6, ""), r
        assert r.stderr == ("upgraderd: no config file: looked at /etc/upgraderd/upgraderd.yaml; write "
                            "a starter config with `upgraderd init` (it creates "
                            "/etc/upgraderd/upgraderd.yaml) or give one with -c FILE\n")
    r = _run(venv, "init", "starter.yaml", cwd=tmp_path)
    assert r.returncode == 0, r
    assert (tmp_path / "starter.yaml").read_text() == (ROOT / "config" / "upgraderd.yaml").read_text()
    r = _run(venv, "check", cwd=tmp_path, env={"UPGRADERD_CONFIG": str(tmp_path / "starter.yaml")})
    assert (r.returncode, r.stdout) == (0, f"{tmp_path}/starter.yaml: ok (1 listener(s), 4 worker(s))\n"), r
