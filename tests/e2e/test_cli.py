"""The command line tells the truth: upgrade, scale, reopen, `reload -c` of another file, init."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.support.upgraderd_proc import ROOT, Daemon, echo_config, free_port, wait_until
from tests.support.loadgen import Load

pytestmark = pytest.mark.e2e


def upgraderd(*args: str, cwd: object = ROOT, env: dict[str, str] | None = None,
              timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run the real `upgraderd` command line and return its result."""
    return subprocess.run([sys.executable, "-m", "upgraderd", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


def test_reload_with_a_file_the_master_does_not_read_sends_nothing(tmp_path):
    port = free_port()
    with Daemon(tmp_path, echo_config(port, count=2)).start() as d:
        other = tmp_path / "other.yaml"
        other.write_text(yaml.safe_dump(echo_config(port, count=3, pidfile=str(d.pidfile))))
        for cmd in ("reload", "upgrade"):
            r = upgraderd(cmd, "-c", str(other))
            assert r.returncode == 1, r
            assert r.stderr == (f"upgraderd: the master reads {d.config_path}, not {other}; nothing "
                                f"was sent. Edit {d.config_path} (or point it at the new file) and "
                                f"reload, or restart the master with -c {other}\n")
        assert "received SIG" not in d.log()
        assert d.status()["hups"] == 0
        # The master's own file, named through a symlink, is the same file.
        link = tmp_path / "link.yaml"
        link.symlink_to(d.config_path)
        d.write_config(echo_config(port, count=2, pidfile=str(d.pidfile)))
        r = upgraderd("reload", "-c", str(link))
        assert (r.returncode, r.stdout) == (0, "reload done: generation 2 ACTIVE\n"), r


def test_upgrade_waits_for_the_reexeced_master_and_reports_a_refusal(tmp_path):
    port = free_port()
    with Daemon(tmp_path, echo_config(port, count=2)).start() as d:
        load = Load("127.0.0.1", port, threads=4, max_seconds=90).start("echo")
        assert load.wait_for_ok(100)
        r = upgraderd("upgrade", "--pidfile", str(d.pidfile))
        assert r.returncode == 0, r
        assert r.stdout.startswith(f"upgrade done: master pid {d.pid} runs upgraderd ")
        assert r.stdout.endswith("generation 2 ACTIVE\n")
        assert "upgraded the master in place" in d.log()
        d.write_config("listeners: [")
        r = upgraderd("upgrade", "--pidfile", str(d.pidfile))
        assert r.returncode == 1, r
        assert r.stderr.startswith("upgraderd: upgrade rejected (the old generation keeps serving)\n")
        assert "master upgrade refused, the config is invalid" in r.stderr
        assert d.proc.poll() is None
        assert load.wait_for_ok(load.result.ok + 100)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)


def test_scale_adds_and_removes_workers_one_signal_at_a_time(tmp_path):
    port = free_port()
    with Daemon(tmp_path, echo_config(port, count=2)).start() as d:
        pidfile = str(d.pidfile)
        r = upgraderd("scale", "+3", "--pidfile", pidfile)
        assert (r.returncode, r.stdout) == (0, "scaled generation 1: 2 -> 5 workers (the next "
                                               "reload goes back to workers.count)\n"), r
        assert d.log().count("received SIGTTIN") == 3
        d.wait_workers(5)
        r = upgraderd("scale", "-2", "--pidfile", pidfile)
        assert (r.returncode, r.stdout) == (0, "scaled generation 1: 5 -> 3 workers (the next "
                                               "reload goes back to workers.count)\n"), r
        assert d.log().count("received SIGTTOU") == 2
        d.wait_workers(3)
        r = upgraderd("scale", "-3", "--pidfile", pidfile)
        assert (r.returncode, r.stderr) == (1, "upgraderd: generation 1 has 3 worker(s); it cannot "
                                               "go below one\n"), r
        assert d.log().count("received SIGTTOU") == 2
        r = upgraderd("scale", "0", "--pidfile", pidfile)
        assert r.returncode == 2 and "expected +N or -N" in r.stderr


def test_reopen_sends_usr1(tmp_path):
    port = free_port()
    log = tmp_path / "master.log"
    with Daemon(tmp_path, echo_config(port, count=1, log={"file": str(log)})).start(wait=False) as d:
        wait_until(lambda: log.exists() and "serving: generation 1 ACTIVE" in log.read_text(), 20,
                   "generation 1 in the log file")
        wait_until(d.status, 10, "the status file")
        log.rename(tmp_path / "master.log.1")
        r = upgraderd("reopen", "--pidfile", str(d.pidfile))
        assert (r.returncode, r.stdout) == (0, f"sent SIGUSR1 to master pid {d.pid}: it reopens "
                                               "its log file\n"), r
        wait_until(lambda: log.exists() and "reopened the log file (SIGUSR1)" in log.read_text(), 15,
                   "a new log file after `upgraderd reopen`")


def test_without_a_config_it_says_where_it_looked_and_init_writes_one(tmp_path):
    env = {"UPGRADERD_CONFIG": str(tmp_path / "missing.yaml")}
    # From outside a checkout the package is the checkout's, so the checkout's file is
    # found: name a missing file and check that the order and the hint are printed.
    r = upgraderd("check", env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(f"{ROOT}/config/upgraderd.yaml: ok"), r
    target = tmp_path / "etc" / "upgraderd.yaml"
    r = upgraderd("init", str(target), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, ""), r
    assert target.read_text() == (ROOT / "config" / "upgraderd.yaml").read_text()
    r = upgraderd("init", str(target), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (1, f"upgraderd: {target} exists; nothing written (--force "
                                           "overwrites it)\n")
    r = upgraderd("check", env={"UPGRADERD_CONFIG": str(target)}, cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, f"{target}: ok (1 listener(s), 4 worker(s))\n"), r
    # A symlink planted where init writes is refused, not followed.
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (tmp_path / "planted.yaml").symlink_to(victim)
    r = upgraderd("init", "--force", str(tmp_path / "planted.yaml"), cwd=tmp_path)
    assert r.returncode == 1 and "cannot write" in r.stderr, r
    assert victim.read_text() == "keep\n"
