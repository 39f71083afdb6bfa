"""Packaging metadata that code depends on: the prometheus-client requirement, the shipped files."""

from __future__ import annotations

import ast
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


# prometheus-client's modules whose API is public and documented; the multiprocess file
# format (mmap_dict, multiprocess, values) is not among them, and upgraderd owns its own.
PUBLIC_PROMETHEUS = {"prometheus_client", "prometheus_client.metrics_core", "prometheus_client.exposition",
                     "prometheus_client.registry"}


def test_only_prometheus_clients_public_api_is_used_so_it_needs_no_upper_bound():
    used = set()
    for path in (ROOT / "upgraderd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prometheus_client"):
                used.add(node.module)
                assert not any(a.name.startswith("_") for a in node.names), (path, ast.unparse(node))
            elif isinstance(node, ast.Import):
                used.update(a.name for a in node.names if a.name.startswith("prometheus_client"))
            elif isinstance(node, ast.Attribute) and node.attr in ("_accumulate_metrics", "_multiprocess_mode"):
                raise AssertionError(f"{path}: uses prometheus-client's private {node.attr}")
    assert used and used <= PUBLIC_PROMETHEUS, sorted(used - PUBLIC_PROMETHEUS)
    req = _requirement("prometheus-client")
    assert not any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), req
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
