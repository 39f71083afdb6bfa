"""Packaging metadata that code depends on: the prometheus-client bound, the shipped files."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

from upgraderd.service import defaults

ROOT = Path(__file__).resolve().parents[2]


def _requirement(name: str) -> Requirement:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in doc["project"]["dependencies"]]
    return next(r for r in reqs if r.name == name)


def test_prometheus_client_has_an_upper_bound_that_the_installed_version_meets():
    # multiproc.py reads prometheus-client's internal mmap_dict format: a new minor
    # version may change it, so the range is closed and the tested version inside it.
    req = _requirement("prometheus-client")
    assert any(s.operator == "<" for s in req.specifier), req
    assert req.specifier.contains(version("prometheus-client")), (req, version("prometheus-client"))


def test_license_and_typed_marker_exist():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == {"text": "MIT"}
    assert (ROOT / "upgraderd" / "py.typed").exists()


def test_a_checkout_finds_its_own_config_first_and_env_wins():
    found = defaults.find_config({})
    assert found.path == str(ROOT / "config" / "upgraderd.yaml")
    assert found.looked == (str(ROOT / "config" / "upgraderd.yaml"), defaults.SYSTEM_PATH)
    assert defaults.find_config({"UPGRADERD_CONFIG": "/nonexistent.yaml"}).looked[0] == "/nonexistent.yaml"
    assert defaults.shipped_dir() == ROOT / "config"


def test_an_installed_package_finds_the_system_config(tmp_path, monkeypatch):
    # As installed: the package sits in site-packages, with no pyproject.toml beside it.
    site = tmp_path / "site-packages" / "upgraderd"
    (site / "defaults").mkdir(parents=True)
    monkeypatch.setattr(defaults, "_PACKAGE", site)
    etc = tmp_path / "etc-upgraderd.yaml"
    monkeypatch.setattr(defaults, "SYSTEM_PATH", str(etc))
    assert defaults.find_config({}) == defaults.Lookup(None, (str(etc),))
    etc.write_text("listeners: []\n")
    assert defaults.find_config({}) == defaults.Lookup(str(etc), (str(etc),))
    assert defaults.shipped_dir() == site / "defaults"
