"""The ConfigMap of deploy/kubernetes/ updated the way kubelet does it, under a running daemon and HTTP load.

The config is the shipped ConfigMap's, moved to loopback ports; it is projected
into a temporary directory as kubelet projects a ConfigMap volume, and updated
by kubelet's `..data` symlink swap (tests/support/kubelet.py). Each real change
rolls one generation in place; a sync that changes nothing rolls none; an
invalid update is rejected and leaves the pod serving.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

import pytest

from tests.support import ROOT, kubelet
from tests.support.loadgen import Load
from tests.support.scrape import scrape, value
from tests.support.upgraderd_proc import Daemon, free_port, wait_until

pytestmark = pytest.mark.e2e

CONFIGMAP = ROOT / "deploy" / "kubernetes" / "configmap.yaml"
KEY = "upgraderd.yaml"


def shipped_config(port: int) -> dict[str, Any]:
    """Return the ConfigMap's config with its listener and metrics moved to free loopback ports."""
    cfg: dict[str, Any] = yaml.safe_load(yaml.safe_load(CONFIGMAP.read_text())["data"][KEY])
    cfg["listeners"][0].update(host="127.0.0.1", port=port)
    cfg["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
    return cfg


def test_configmap_updates_reload_in_place_under_load(tmp_path: Path) -> None:
    port = free_port()
    cfg = shipped_config(port)
    mount = tmp_path / "etc-upgraderd"
    kubelet.project(mount, {KEY: yaml.safe_dump(cfg)}, "2026_01_01_00_00_00.000000001")
    d = Daemon(tmp_path, cfg)
    d.config_path = mount / KEY   # the path the Deployment's command names
    with d.start():
        load = Load("127.0.0.1", port, threads=2, max_seconds=120).start("http")
        try:
            assert load.wait_for_ok(50)
            # 1. A real change: one new generation, in place.
            cfg["drain"]["timeout"] = "20s"
            kubelet.project(mount, {KEY: yaml.safe_dump(cfg)}, "2026_01_01_00_01_00.000000002")
            d.wait_log(r"reload done: generation 2 ACTIVE", timeout=20)
            # 2. A sync that rewrites the same data: the fingerprint is unchanged, nothing rolls.
            kubelet.project(mount, {KEY: yaml.safe_dump(cfg)}, "2026_01_01_00_02_00.000000003")
            end = time.monotonic() + 3 * 0.5   # three debounce periods (the shipped 500ms)
            while time.monotonic() < end:
                assert "generation 3 STARTING" not in d.log() and "watched path changed" not in d.log()[
                    d.log().index("reload done: generation 2"):]
                time.sleep(0.05)
            # 3. An invalid update: rejected with its location, still serving generation 2.
            broken = yaml.safe_dump(cfg).replace(f"port: {port}", "port: eighty")
            kubelet.project(mount, {KEY: broken}, "2026_01_01_00_03_00.000000004")
            d.wait_log(r"reload failed, still serving generation 2", timeout=20)
            # 4. A fix with one more worker: the next generation.
            cfg["workers"]["count"] = 3
            kubelet.project(mount, {KEY: yaml.safe_dump(cfg)}, "2026_01_01_00_04_00.000000005")
            d.wait_log(r"reload done: generation 3 ACTIVE", timeout=20)
            mark = load.mark()
            wait_until(lambda: sum(load.answers_since(mark).values()) >= 20, 10, "answers from generation 3")
            after = load.answers_since(mark)
            samples = scrape(cfg)
        finally:
            result = load.stop()
        log = d.log()
    assert result.failures == {}, (result.failures, result.examples)
    assert all(b.startswith("generation=3 ") for b in after), after
    assert log.count("STARTING:") == 3
    assert value(samples, "upgraderd_watch_triggers_total") == 3
    assert value(samples, "upgraderd_reloads_total", result="success") == 2
    assert value(samples, "upgraderd_reloads_total", result="rejected") == 1
    rejected = next(line for line in log.splitlines() if "reload failed" in line)
    assert f"{mount / KEY}:" in rejected and "listeners[0].port" in rejected and "eighty" in rejected
    assert sorted(p.name for p in mount.iterdir() if p.name.startswith("..2026")) == ["..2026_01_01_00_04_00.000000005"]
