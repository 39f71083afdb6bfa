"""The operator's interface: bad reloads change nothing, `upgraderd reload` reports the outcome."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.support import ROOT
from tests.support.loadgen import Load
from tests.support.upgraderd_proc import Daemon, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e

FIXTURE = str(ROOT / "tests" / "fixtures" / "echo_worker.py")


def upgraderd(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run the real `upgraderd` command line and return its result."""
    return subprocess.run([sys.executable, "-m", "upgraderd", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, stdin=subprocess.DEVNULL)


def echo_yaml(port: int, line3: str = "    port: {port}") -> str:
    """Return a config whose third line can be replaced, to put an error at a known place."""
    return "\n".join([
        "listeners:",
        "  - name: echo",
        line3.format(port=port),
        "workers: {count: 4, app: echo}",
        "ready: {timeout: 10s}",
        "drain: {timeout: 10s}",
    ]) + "\n"


def test_bad_config_on_hup_under_load_changes_nothing(tmp_path):
    port = free_port()
    with Daemon(tmp_path, echo_yaml(port)).start() as d:
        gen1 = d.workers()
        load = Load("127.0.0.1", port, threads=6, max_seconds=90).start("echo")
        assert load.wait_for_ok(200)
        for bad, located in [
            (echo_yaml(port, "    port: 70000"),
             "upgraderd.yaml:3:11: listeners[0].port: 70000 is out of range; allowed: 1..65535"),
            (echo_yaml(port, "    port: [{port}"),
             "upgraderd.yaml:4:8: YAML syntax error: expected ',' or ']', but got ':' "
             "(while parsing a flow sequence at 3:11)"),
            (echo_yaml(port).replace("app: echo", "app: echo, user: no-such-user-x"),
             "upgraderd.yaml:4:38: workers.user: no such user: 'no-such-user-x'"),
        ]:
            d.write_config(bad)
            d.send(signal.SIGHUP)
            d.wait_log(r"reload failed, still serving generation 1: " + r"\S*" + re.escape(located))
            assert load.wait_for_ok(load.result.ok + 200)
        assert d.workers() == gen1
        assert "STARTING" not in d.log().split("serving: generation 1 ACTIVE")[1]
        assert d.status()["reloads"] == {"success": 0, "failed": 0, "rejected": 3}
        d.write_config(echo_yaml(port))
        d.send(signal.SIGHUP)
        d.wait_log(r"reload done: generation 2 ACTIVE")
        assert load.wait_for_ok(load.result.ok + 200)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        wait_until(lambda: not (d.workers() & gen1), 15, "generation 1 to retire")


def test_reload_command_reports_the_outcome(tmp_path):
    port = free_port()
    with Daemon(tmp_path, echo_config(port)).start() as d:
        pidfile = str(d.pidfile)
        load = Load("127.0.0.1", port, threads=4, max_seconds=90).start("echo")
        assert load.wait_for_ok(100)

        d.write_config(echo_yaml(port, "    port: 0"))
        r = upgraderd("reload", "--pidfile", pidfile)
        assert r.returncode == 1, r
        assert r.stderr.startswith("upgraderd: reload rejected (the old generation keeps serving)\n")
        assert f"{d.config_path}:3:11: listeners[0].port: 0 is out of range" in r.stderr

        broken = echo_config(port, ready={"timeout": "5s"})
        broken["workers"] = {"count": 4, "command": [sys.executable, FIXTURE, "--exit", "3"]}
        d.write_config(broken)
        r = upgraderd("reload", "--pidfile", pidfile)
        assert r.returncode == 1, r
        assert r.stderr.startswith("upgraderd: reload failed: generation 2 did not become ACTIVE "
                                   "(the old one keeps serving)\ngeneration 2: slot ")
        assert "exited at start-up: exit code 3" in r.stderr

        d.write_config(echo_config(port))
        r = upgraderd("reload", "--pidfile", pidfile)
        assert (r.returncode, r.stdout, r.stderr) == (0, "reload done: generation 3 ACTIVE\n", "")

        # The same, with the pidfile named by the config file instead of --pidfile.
        d.write_config(echo_config(port, pidfile=pidfile))
        r = upgraderd("reload", "-c", str(d.config_path))
        assert (r.returncode, r.stdout) == (0, "reload done: generation 4 ACTIVE\n"), r

        assert load.wait_for_ok(load.result.ok + 100)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        d.settled()
        wait_until(lambda: len(d.status()["generations"]) == 1, 15, "old generations to retire")
        workers = d.workers()

        r = upgraderd("status", "--pidfile", pidfile)
        assert r.returncode == 0, r
        lines = r.stdout.splitlines()
        assert lines[0].startswith(f"master pid {d.pid}, up ")
        assert lines[1] == f"config {d.config_path}"
        assert lines[2] == f"listener echo 127.0.0.1:{port} (reuseport)"
        assert lines[3].startswith("generation 4 ACTIVE for ") and lines[3].endswith(", 4 worker(s)")
        shown = {int(ln.split()[3]) for ln in lines[4:8]}
        assert shown == workers and all(" READY  age " in ln for ln in lines[4:8])
        assert lines[8:] == ["last reload: success: generation 4 ACTIVE",
                             "reloads: 2 succeeded, 1 failed, 1 rejected"]


def test_client_commands_without_a_master(tmp_path):
    pidfile = str(tmp_path / "none.pid")
    gone = f"no master is running: pidfile {pidfile} does not exist"
    # LSB: `stop` of a stopped service succeeds, `status` says 3, other actions 7.
    for cmd, code in (("reload", 7), ("upgrade", 7), ("scale", 7), ("reopen", 7), ("status", 3)):
        r = upgraderd(cmd, *(("+1",) if cmd == "scale" else ()), "--pidfile", pidfile)
        assert (r.returncode, r.stdout, r.stderr) == (code, "", f"upgraderd: {gone}\n"), r
    r = upgraderd("stop", "--pidfile", pidfile)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"upgraderd: already stopped ({gone})\n", ""), r
    # A pidfile naming a live process that is not upgraderd is never signalled.
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "none.pid").write_text(f"{sleeper.pid}\n")
        r = upgraderd("stop", "--pidfile", pidfile)
        assert r.returncode == 0 and f"does not hold {pidfile}.lock (stale pidfile)" in r.stdout
        r = upgraderd("reload", "--pidfile", pidfile)
        assert r.returncode == 7 and f"does not hold {pidfile}.lock (stale pidfile)" in r.stderr
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_invalid_config_for_reload_sends_nothing(tmp_path):
    port = free_port()
    with Daemon(tmp_path, echo_config(port)).start() as d:
        d.write_config(echo_yaml(port, "    port: -1"))
        r = upgraderd("reload", "-c", str(d.config_path))
        assert r.returncode == 1
        assert r.stderr.splitlines()[0] == f"{d.config_path}:3:11: listeners[0].port: -1 is out of range; allowed: 1..65535"
        assert "nothing was sent to the master" in r.stderr
        assert "reload" not in d.log().split("serving: generation 1 ACTIVE")[1]


def test_fast_stop_command(tmp_path):
    port = free_port()
    d = Daemon(tmp_path, echo_config(port, count=2)).start()
    try:
        workers = d.workers()
        r = upgraderd("stop", "--fast", "--pidfile", str(d.pidfile))
        assert (r.returncode, r.stdout) == (0, f"stopped (pid {d.pid})\n"), r
        assert d.proc.wait(5) == 0
        assert "fast stop: SIGKILL in 1s" in d.log()
        wait_until(lambda: not any(os.path.exists(f"/proc/{p}/status") and "State:\tZ" not in
                                   open(f"/proc/{p}/status").read() for p in workers), 10, "the workers to exit")
        assert not d.pidfile.exists()
    finally:
        d.stop()


def test_workers_run_in_the_configured_directory(tmp_path):
    port = free_port()
    (tmp_path / "wd").mkdir()
    cfg = echo_config(port, count=2)
    cfg["workers"] = {"count": 2, "app": "echo", "cwd": "wd", "env": {"GREETING": "hi"}}
    with Daemon(tmp_path, cfg).start() as d:
        for pid in d.workers():
            assert os.readlink(f"/proc/{pid}/cwd") == str(tmp_path / "wd")  # relative to the config file
            assert b"GREETING=hi" in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
