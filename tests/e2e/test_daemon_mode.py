"""`upgraderd run --daemon`: detach, pidfile, reload, log reopening, stop; stale and live pidfiles."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT
from tests.support.upgraderd_proc import alive, children, Daemon, echo_config, free_port, text_of, wait_until

pytestmark = pytest.mark.e2e

FIXTURE = str(ROOT / "tests" / "fixtures" / "echo_worker.py")


def upgraderd(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run the real `upgraderd` command line and return its result."""
    return subprocess.run([sys.executable, "-m", "upgraderd", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, stdin=subprocess.DEVNULL)


def daemon_config(tmp_path: Path, port: int, **sections: object) -> Path:
    cfg = echo_config(port, count=2, log={"file": str(tmp_path / "upgraderd.log"), "format": "json"},
                      pidfile=str(tmp_path / "upgraderd.pid"), **sections)
    path = tmp_path / "upgraderd.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def echo_once(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data


def log_records(path: Path) -> list[dict[str, object]]:
    """Return the JSON log records in `path` (every line must be one)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def kill_tree(pid: int) -> None:
    """Stop a daemon a failed test left behind, and its workers, by pid."""
    for child in children(pid):
        os.kill(child, signal.SIGKILL)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_daemon_start_pidfile_reload_reopen_stop(tmp_path):
    port = free_port()
    config = daemon_config(tmp_path, port)
    pidfile, log = tmp_path / "upgraderd.pid", tmp_path / "upgraderd.log"
    r = upgraderd("run", "-c", str(config), "--daemon")
    assert r.returncode == 0, r
    pid = int(r.stdout.split("(pid ")[1].split(")")[0])
    try:
        assert r.stdout == f"upgraderd: serving in the background (pid {pid}); log {log}\n"
        assert pidfile.read_text() == f"{pid}\n"
        # Detached: not our child, no controlling terminal, / and umask 022, std fds redirected.
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(stat[1]) != os.getpid() and int(stat[4]) == 0  # ppid, tty_nr
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        assert "Umask:\t0022" in Path(f"/proc/{pid}/status").read_text()
        assert [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)] == ["/dev/null", str(log), str(log)]
        gen1 = children(pid)
        assert len(gen1) == 2
        assert echo_once(port, b"hello") == b"hello"
        assert any(str(rec["message"]).startswith("serving: generation 1 ACTIVE") for rec in log_records(log))

        # A second master with the same pidfile refuses to start, on another port too.
        (tmp_path / "second").mkdir()
        other = daemon_config(tmp_path / "second", free_port())
        r2 = upgraderd("run", "-c", str(other), "--daemon", "--pidfile", str(pidfile))
        assert r2.returncode == 3
        assert r2.stderr == f"upgraderd: already running (pid {pid}); pidfile {pidfile}\n"

        r = upgraderd("reload", "-c", str(config))
        assert (r.returncode, r.stdout) == (0, "reload done: generation 2 ACTIVE\n"), r
        wait_until(lambda: not (children(pid) & gen1), 15, "generation 1 to exit")

        # logrotate: move the file away, SIGUSR1, and the master writes a new one.
        log.rename(tmp_path / "upgraderd.log.1")
        os.kill(pid, signal.SIGUSR1)
        wait_until(lambda: log.exists() and "reopened the log file" in log.read_text(), 15, "a new log file")
        assert os.readlink(f"/proc/{pid}/fd/2") == str(log)
        assert echo_once(port, b"after rotation") == b"after rotation"

        workers = children(pid)
        r = upgraderd("stop", "-c", str(config))
        assert (r.returncode, r.stdout) == (0, f"stopped (pid {pid})\n"), r
        assert not alive(pid) and not any(alive(w) for w in workers)
        assert not pidfile.exists()
        assert not Path(f"{pidfile}.status.json").exists()
        records = log_records(log)
        assert records[-1]["message"] == "upgraderd stopped" and records[-1]["pid"] == pid
        assert all(set(rec) == {"time", "level", "pid", "message"} for rec in records)
    finally:
        kill_tree(pid)


def test_daemon_reports_a_failed_start(tmp_path):
    port = free_port()
    config = daemon_config(tmp_path, port, ready={"timeout": "5s"})
    cfg = yaml.safe_load(config.read_text())
    cfg["workers"] = {"count": 2, "command": [sys.executable, FIXTURE, "--exit", "3"]}
    config.write_text(yaml.safe_dump(cfg))
    r = upgraderd("run", "-c", str(config), "--daemon")
    assert r.returncode == 1, r
    assert r.stderr.startswith("upgraderd: the first generation failed: slot ")
    assert "exited at start-up: exit code 3" in r.stderr
    assert not (tmp_path / "upgraderd.pid").exists()
    # The daemon removes its lock file (as at any clean stop) before it reports; its pid is
    # in its log, whose first line is the master's.
    assert not (tmp_path / "upgraderd.pid.lock").exists()
    daemon_pid = int(json.loads((tmp_path / "upgraderd.log").read_text().splitlines()[0])["pid"])
    try:
        wait_until(lambda: not alive(daemon_pid), 15, "the failed daemon to exit")
    finally:
        kill_tree(daemon_pid)


def test_daemon_reports_a_bind_error_before_detaching(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = upgraderd("run", "-c", str(daemon_config(tmp_path, port)), "--daemon")
    assert r.returncode == 3, r
    assert r.stderr == (f"upgraderd: cannot start: cannot listen on 127.0.0.1:{port}: "
                        "Address already in use\n")
    assert not (tmp_path / "upgraderd.pid").exists()


def test_daemon_needs_a_log_file_and_the_readme_says_so(tmp_path):
    # The shipped config, as the README's `upgraderd run --daemon` uses it: refused before it binds.
    path = ROOT / "config" / "upgraderd.yaml"
    r = upgraderd("run", "-c", str(path), "--daemon", "--pidfile", str(tmp_path / "p.pid"))
    assert r.returncode == 1
    assert r.stderr == (f"{path}: log.file: must be set for --daemon (a daemon has no terminal to log "
                        "to); add e.g. `log: {file: /var/log/upgraderd.log}`, or run without --daemon\n")
    line = next(ln for ln in (ROOT / "README.md").read_text().splitlines()
                if ln.startswith("upgraderd run --daemon"))
    assert "log.file" in line, line


def test_stale_pidfile_is_replaced_with_a_warning(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile = tmp_path / "upgraderd.pid"
    pidfile.write_text(f"{dead.pid}\n")
    port = free_port()
    with Daemon(tmp_path, echo_config(port)).start() as d:
        assert f"WARNING stale pidfile {pidfile} (pid {dead.pid} is not running); it will be " \
               "replaced once this master serves" in d.log()
        wait_until(lambda: text_of(pidfile) == f"{d.pid}\n", 10, "the pidfile to name the master")
    assert d.proc.returncode == 0
    assert not pidfile.exists()


def test_live_master_blocks_a_second_one_even_while_starting(tmp_path):
    port = free_port()
    slow = echo_config(port, ready={"mode": "delay", "after": "60s", "timeout": "90s"})
    first = Daemon(tmp_path, slow).start(wait=False)
    try:
        d2 = tmp_path / "second"
        d2.mkdir()
        wait_until(lambda: "generation 1 STARTING" in first.log(), 20, "the first master to start")
        assert not first.pidfile.exists()  # not serving yet, but it holds the lock
        (d2 / "c.yaml").write_text(yaml.safe_dump(echo_config(free_port())))
        r = upgraderd("run", "-c", str(d2 / "c.yaml"), "--pidfile", str(first.pidfile))
        assert r.returncode == 3
        assert r.stderr == f"upgraderd: already running (pid {first.pid}); pidfile {first.pidfile}\n"
    finally:
        first.stop()


def test_usr2_keeps_the_pidfile_lock_across_the_exec(tmp_path):
    with Daemon(tmp_path, echo_config(free_port(), count=1)).start() as first:
        first.send(signal.SIGUSR2)
        first.wait_log(r"reload done: generation 2 ACTIVE")
        assert "stale pidfile" not in first.log()
        assert first.pidfile.read_text().strip() == str(first.pid)
        d2 = tmp_path / "second"
        d2.mkdir()
        (d2 / "c.yaml").write_text(yaml.safe_dump(echo_config(free_port())))
        r = upgraderd("run", "-c", str(d2 / "c.yaml"), "--pidfile", str(first.pidfile))
        assert r.returncode == 3
        assert r.stderr == f"upgraderd: already running (pid {first.pid}); pidfile {first.pidfile}\n"
        # Exactly one descriptor of the lock file: the one handed over, not a second one.
        held = [os.readlink(f"/proc/{first.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{first.pid}/fd")]
        assert held.count(f"{first.pidfile}.lock") == 1
