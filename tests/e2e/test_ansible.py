"""deploy/ansible/ for real: ansible-core rolls releases across three upgraderd hosts under HTTP load.

Each host is an inventory host with a local connection and its own port,
config, pidfile and app root; the masters run here as subprocesses (the role's
service management is off: `upgraderd_service: none`). Every host reloads
through a canary (1 of 2 workers, a 2 s window). A good release must roll
everywhere with 0 failed requests; a release whose workers die at start-up must
stop at the first host, which keeps its old generation, and leave the later
hosts untouched, with the play exiting non-zero and saying why. A release whose
canary fails on the second host only (it crashes there, 1 s after it serves)
must be promoted on the first, rolled back on the second (`upgraderd reload`
exits 1 naming the crashes check), and never reach the third.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT
from tests.support.loadgen import Load
from tests.support.upgraderd_proc import Daemon, free_port

pytestmark = pytest.mark.e2e

ANSIBLE = ROOT / "deploy" / "ansible"
PLAYBOOK = shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) or shutil.which("ansible-playbook")
HOSTS = ("h1", "h2", "h3")

GOOD_APP = """\
# release {rid}: the built-in HTTP app stands in for the application's code
import os, runpy, signal, threading
if os.environ.get("FAULTY_RELEASE") == "{rid}":
    # This release fails on a host that says so (think of a host-local dependency it breaks):
    # its workers drain what they accepted 1 s after start-up and exit 1.
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    try:
        runpy.run_module("upgraderd.apps.http", run_name="__main__", alter_sys=True)
    finally:
        os._exit(1)
runpy.run_module("upgraderd.apps.http", run_name="__main__", alter_sys=True)
"""
BAD_APP = """\
import sys
sys.exit("release {rid}: cannot start: settings.py is missing from the release")
"""


def make_release(src: Path, rid: str, good: bool) -> Path:
    d = src / rid
    d.mkdir(parents=True)
    (d / "app.py").write_text((GOOD_APP if good else BAD_APP).format(rid=rid))
    return d


def inventory(tmp: Path) -> dict[str, Any]:
    hosts: dict[str, Any] = {}
    for h in HOSTS:
        work = tmp / "hosts" / h
        port, metrics = free_port(), f"127.0.0.1:{free_port()}"
        hosts[h] = {
            "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            "app_root": str(work / "app"), "port": port,
            "upgraderd_install": False, "upgraderd_service": "none",
            "upgraderd_bin": str(Path(sys.executable).parent / "upgraderd"),
            "upgraderd_config_path": str(work / "upgraderd.yaml"),
            "upgraderd_pidfile": str(work / "upgraderd.pid"),
            "upgraderd_metrics_listen": metrics,
            "upgraderd_reload_timeout": 30,
            "upgraderd_config": {
                "listeners": [{"name": "web", "host": "127.0.0.1", "port": port}],
                "workers": {"count": 2, "command": [sys.executable, str(work / "app" / "current" / "app.py")],
                            "env": {"RELEASE": "{{ release_id }}", "FAULTY_RELEASE": "r4" if h == "h2" else ""}},
                "ready": {"timeout": "10s"}, "drain": {"timeout": "10s"},
                "rollout": {"strategy": "canary", "canary": {"workers": 1, "window": "2s"}},
                "metrics": {"listen": metrics}, "pidfile": str(work / "upgraderd.pid"),
            },
        }
    return {"upgraderd": {"hosts": hosts}}


def play(tmp: Path, playbook: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run `playbook` of deploy/ansible against the test inventory; return the finished run."""
    env = {**os.environ, "ANSIBLE_HOME": str(tmp / "ansible-home"), "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0", "ANSIBLE_DEPRECATION_WARNINGS": "0"}
    args = [str(PLAYBOOK), "-i", str(tmp / "inventory.yml"), str(ANSIBLE / playbook)]
    for k, v in extra.items():
        args += ["-e", f"{k}={v}"]
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp, timeout=300)


def current(tmp: Path, host: str) -> str:
    return os.readlink(tmp / "hosts" / host / "app" / "current")


@pytest.mark.timeout(600)   # three plays of ansible-playbook over three hosts
@pytest.mark.skipif(PLAYBOOK is None, reason="ansible-core is not installed (pip install -e '.[test]')")
def test_a_good_release_rolls_everywhere_and_a_bad_one_stops_at_its_host(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inv, sort_keys=False))
    src = tmp_path / "src"
    r1 = make_release(src, "r1", good=True)
    for h in HOSTS:   # provisioning: release r1 in place, then the role templates the config
        app = tmp_path / "hosts" / h / "app"
        shutil.copytree(r1, app / "releases" / "r1")
        (app / "current").symlink_to(app / "releases" / "r1")
    setup = play(tmp_path, "site.yml", release_id="r1")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    daemons = {h: Daemon(tmp_path / "hosts" / h, (tmp_path / "hosts" / h / "upgraderd.yaml").read_text())
               for h in HOSTS}
    loads: dict[str, Load] = {}
    try:
        for h, d in daemons.items():
            d.start()
            loads[h] = Load("127.0.0.1", inv["upgraderd"]["hosts"][h]["port"], threads=1, max_seconds=570).start("http")
        assert all(load.wait_for_ok(30) for load in loads.values())

        t0 = time.monotonic()
        good = play(tmp_path, "release.yml", release_id="r2", release_src=str(make_release(src, "r2", True)))
        took_good = time.monotonic() - t0
        assert good.returncode == 0, good.stdout + good.stderr
        for h, d in daemons.items():
            assert d.settled() == 2
            assert current(tmp_path, h).endswith("/releases/r2")
            assert "release r2 serving as generation 2" in good.stdout

        t0 = time.monotonic()
        bad = play(tmp_path, "release.yml", release_id="r3", release_src=str(make_release(src, "r3", False)))
        took_bad = time.monotonic() - t0
        assert bad.returncode != 0
        assert "release r3 failed on h1" in bad.stdout, bad.stdout
        assert "settings.py is missing" in bad.stdout or "exit code 1" in bad.stdout, bad.stdout
        assert "h1 keeps serving generation 2" in bad.stdout
        print("\n" + next(line for line in bad.stdout.splitlines() if "release r3 failed on h1" in line))
        # The failing host: generation 3 failed, generation 2 still serves, release and config put back.
        d1 = daemons["h1"]
        d1.wait_log(r"reload failed, still serving generation 2")
        assert d1.settled() == 2
        assert current(tmp_path, "h1").endswith("/releases/r2")
        assert "RELEASE: r2" in (tmp_path / "hosts" / "h1" / "upgraderd.yaml").read_text()
        # The later hosts: never touched.
        for h in ("h2", "h3"):
            assert "generation 3" not in daemons[h].log()
            assert current(tmp_path, h).endswith("/releases/r2")
            assert not (tmp_path / "hosts" / h / "app" / "releases" / "r3").exists()
            assert "RELEASE: r2" in (tmp_path / "hosts" / h / "upgraderd.yaml").read_text()
        for load in loads.values():
            mark = load.mark()
            assert load.wait_for_ok(load.result.ok + 20)
            assert all(b.startswith("generation=2 ") for b in load.answers_since(mark))

        # r4 fails on h2 only, in its canary's window: promoted on h1, rolled back on h2, h3 never touched.
        t0 = time.monotonic()
        canary = play(tmp_path, "release.yml", release_id="r4", release_src=str(make_release(src, "r4", True)))
        took_canary = time.monotonic() - t0
        assert canary.returncode != 0
        assert "h1: release r4 serving as generation 4" in canary.stdout, canary.stdout
        assert "release r4 failed on h2" in canary.stdout, canary.stdout
        assert "check crashes failed: 1 worker exit(s) of generation 3" in canary.stdout, canary.stdout
        assert "h2 keeps serving generation 2" in canary.stdout
        print(next(line for line in canary.stdout.splitlines() if "release r4 failed on h2" in line))
        assert daemons["h1"].settled() == 4 and current(tmp_path, "h1").endswith("/releases/r4")
        d2 = daemons["h2"]
        d2.wait_log(r"rollout: generation 3 rolled back after [0-9.]+s: check crashes failed")
        assert d2.settled() == 2
        assert current(tmp_path, "h2").endswith("/releases/r2")
        assert "RELEASE: r2" in (tmp_path / "hosts" / "h2" / "upgraderd.yaml").read_text()
        assert "generation 3" not in daemons["h3"].log()
        assert current(tmp_path, "h3").endswith("/releases/r2")
        assert not (tmp_path / "hosts" / "h3" / "app" / "releases" / "r4").exists()
        assert "RELEASE: r2" in (tmp_path / "hosts" / "h3" / "upgraderd.yaml").read_text()
    finally:
        results = {h: load.stop() for h, load in loads.items()}
        for d in daemons.values():
            d.stop()
    for h, result in results.items():
        assert result.failures == {}, (h, result.failures, result.examples)
        assert result.ok > 0
    print(f"\nansible: good release over 3 hosts {took_good:.1f}s, bad release stopped at h1 after "
          f"{took_bad:.1f}s, a canary failing on h2 stopped there after {took_canary:.1f}s; requests per host {({h: r.ok for h, r in results.items()})}, 0 failed")


@pytest.mark.skipif(PLAYBOOK is None, reason="ansible-core is not installed (pip install -e '.[test]')")
def test_the_role_installs_the_shipped_systemd_unit_with_the_hosts_paths(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    host = inv["upgraderd"]["hosts"]["h1"]
    host.update(upgraderd_service="systemd", upgraderd_start=False, upgraderd_unit_dir=str(tmp_path / "units"))
    inv["upgraderd"]["hosts"] = {"h1": host}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inv, sort_keys=False))
    app = Path(host["app_root"])
    shutil.copytree(make_release(tmp_path / "src", "r1", good=True), app / "releases" / "r1")
    (app / "current").symlink_to(app / "releases" / "r1")
    (tmp_path / "units").mkdir()
    run = play(tmp_path, "site.yml", release_id="r1")
    assert run.returncode == 0, run.stdout + run.stderr
    shipped = (ROOT / "deploy" / "systemd" / "upgraderd.service").read_text()
    unit = (tmp_path / "units" / "upgraderd.service").read_text()
    expected = shipped.replace("/usr/local/bin/upgraderd", host["upgraderd_bin"]).replace(
        "/etc/upgraderd/upgraderd.yaml", host["upgraderd_config_path"])
    assert unit.rstrip("\n") == expected.rstrip("\n")
    assert f"ExecReload={host['upgraderd_bin']} reload -c ${{UPGRADERD_CONFIG}}" in unit
    assert "Reload upgraderd and wait" not in run.stdout, "no master runs yet: nothing to reload"
    rendered = yaml.safe_load(Path(host["upgraderd_config_path"]).read_text())
    assert rendered["workers"]["env"] == {"RELEASE": "r1", "FAULTY_RELEASE": ""}   # h1 runs every release
