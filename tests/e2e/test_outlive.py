"""The listeners outlive the master: orphan takeover, the fd store, socket activation, one master per address.

Each test runs the real daemon with real clients on 127.0.0.1. The restart
tests SIGKILL the master under load and start a new one at once, then assert
that not one round trip failed: nothing refused, nothing reset.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tests.support import ROOT
from tests.support.fdstore import FdStoreStandIn
from tests.support.loadgen import Load
from tests.support.upgraderd_proc import Daemon, alive, children, echo_config, free_port, stop_after_restart, wait_until
from upgraderd.system import conflict

pytestmark = pytest.mark.e2e

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="pidfd_getfd needs ptrace rights over the "
                                "orphans: root (or yama ptrace_scope 0, not assumed here)")


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def _sigkill(d: Daemon) -> set[int]:
    """SIGKILL the master; return its workers, now orphans."""
    workers = d.workers()
    d.send(signal.SIGKILL)
    assert d.proc is not None
    d.proc.wait(10)
    return workers


@needs_root
@pytest.mark.parametrize("mode", ["reuseport", "shared"])
def test_a_sigkilled_master_restarted_at_once_takes_over_its_orphans_and_loses_nothing(tmp_path, mode):
    port = free_port()
    cfg = echo_config(port, mode=mode, count=2)
    d = Daemon(tmp_path, cfg).start()
    orphans: set[int] = set()
    d2 = None
    load = Load("127.0.0.1", port, threads=2, max_seconds=40).start("echo")
    try:
        assert load.wait_for_ok(100)
        orphans = _sigkill(d)
        d2 = Daemon(tmp_path, cfg).start()
        assert f"took over 2 orphaned worker(s) of dead master pid {d.pid}" in d2.log()
        assert len(re.findall(r"adopted fd 3 of orphan pid \d+ for listener 'echo'", d2.log())) == \
            (2 if mode == "reuseport" else 1)
        d2.wait_log(r"the orphaned workers have exited")
        assert not any(alive(p) for p in orphans)
        ok = load.result.ok
        assert load.wait_for_ok(ok + 100)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        assert "cannot listen" not in d2.log()
    finally:
        load.stop()
        stop_after_restart(orphans, d, d2)


def test_an_orphan_keeps_serving_until_its_grace_period_ends(tmp_path):
    port = free_port()
    cfg = echo_config(port, count=1, drain={"timeout": "10s", "orphan_grace": "2s"})
    d = Daemon(tmp_path, cfg).start()
    orphans = _sigkill(d)
    try:
        # No master: the orphan still answers ...
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"still here")
            assert s.recv(16) == b"still here"
        # ... and drains and exits once its grace period is over.
        wait_until(lambda: not any(alive(p) for p in orphans), 15, "the orphan to exit after its grace")
    finally:
        _kill_all(orphans)


@needs_root
def test_a_master_restarted_with_its_stored_fds_loses_nothing_while_no_worker_runs(tmp_path):
    """The fd store alone: the orphans are drained away, only the stand-in holds the sockets."""
    port = free_port()
    cfg = echo_config(port, count=2)
    store = FdStoreStandIn(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": store.path}
    d = Daemon(tmp_path, cfg, env=env).start()
    orphans: set[int] = set()
    d2 = None
    load = Load("127.0.0.1", port, threads=2, max_seconds=40).start("echo")
    try:
        wait_until(lambda: sorted(store.names()) == ["echo", "echo/1"], 10, "both slots in the fd store")
        assert load.wait_for_ok(100)
        orphans = _sigkill(d)
        for pid in orphans:
            os.kill(pid, signal.SIGTERM)  # what a service manager's stop does to the rest of the cgroup
        wait_until(lambda: not any(alive(p) for p in orphans), 10, "the orphans to drain")
        # Nobody accepts now; connections wait in the stored sockets' queues.
        wrap, fds = store.wrap()
        d2 = Daemon(tmp_path, cfg, env=env, wrap=wrap, pass_fds=fds).start()
        log = d2.log()
        assert re.search(r"adopted passed fd [34] \('echo'\) for listener 'echo' slot 0", log)
        assert re.search(r"adopted passed fd [34] \('echo/1'\) for listener 'echo' slot 1", log)
        assert "took over" not in log
        ok = load.result.ok
        assert load.wait_for_ok(ok + 100)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        assert sorted(store.names()) == ["echo", "echo/1"]  # the same sockets, not stored twice
    finally:
        load.stop()
        stop_after_restart(orphans, d, d2)
        store.close()


def test_a_second_master_on_the_same_address_is_refused_with_exit_3(tmp_path):
    port = free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Daemon(tmp_path / "a", echo_config(port))
    second = Daemon(tmp_path / "b", echo_config(port, mode="shared", count=1))
    try:
        first.start()
        second.start(wait=False)
        assert second.proc is not None
        assert second.proc.wait(20) == 3
        assert f"another upgraderd master (pid {first.pid}) already serves 127.0.0.1:{port}" in second.log()
        assert first.proc is not None and first.proc.poll() is None
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"first")
            assert s.recv(8) == b"first"
    finally:
        second.stop()
        first.stop()


def test_orphans_of_another_dead_master_do_not_block_a_new_one(tmp_path):
    port = free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    dead = Daemon(tmp_path / "a", echo_config(port, count=1, drain={"timeout": "5s", "orphan_grace": "20s"}))
    dead.start()
    orphans = _sigkill(dead)
    d2 = Daemon(tmp_path / "b", echo_config(port, count=1))
    try:
        d2.start()
        assert "already serves" not in d2.log()
        assert "took over" not in d2.log()  # another pidfile: not ours to take
    finally:
        d2.stop()
        _kill_all(orphans)


needs_activate = pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                                    reason="systemd-socket-activate missing (scripts/test-deps installs it)")


@needs_activate
def test_a_socket_activated_master_serves_the_connection_that_woke_it(tmp_path):
    port = free_port()
    cfg = echo_config(port, mode="shared", count=2)
    wrap = ("systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=echo",
            "-E", "PYTHONUNBUFFERED=1", "-E", f"TMPDIR={tmp_path}")
    d = Daemon(tmp_path, cfg, wrap=wrap).start(wait=False)
    try:
        wait_until(lambda: "Listening on" in d.log(), 10, "systemd-socket-activate to listen")
        # The first client connects before any master runs: it waits in the passed socket's queue.
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"early bird")
            assert s.recv(16) == b"early bird"
        d.wait_log(r"serving: generation 1 ACTIVE")
        assert "adopted passed fd 3 ('echo') for listener 'echo' slot 0 (127.0.0.1:" in d.log()
        assert "cannot listen" not in d.log() and "steering" not in d.log()
        load = Load("127.0.0.1", port, threads=2, max_seconds=20, max_per_thread=100).start("echo")
        d.hup()
        d.wait_log(r"generation 1 ACTIVE -> DRAINING")  # a reload over the passed socket
        d.wait_log(r"generation 1 DRAINING -> RETIRED")
        result = load.stop()
        assert result.failures == {} and result.ok > 0, (result.failures, result.examples)
    finally:
        d.stop()


@needs_activate
def test_a_passed_socket_on_another_address_is_an_error_naming_the_fd_and_the_listener(tmp_path):
    port, other = free_port(), free_port()
    wrap = ("systemd-socket-activate", "-l", f"127.0.0.1:{other}", "--fdname=echo",
            "-E", "PYTHONUNBUFFERED=1", "-E", f"TMPDIR={tmp_path}")
    d = Daemon(tmp_path, echo_config(port, mode="shared", count=1), wrap=wrap).start(wait=False)
    try:
        wait_until(lambda: "Listening on" in d.log(), 10, "systemd-socket-activate to listen")
        with socket.create_connection(("127.0.0.1", other), timeout=5):
            pass  # wakes it: systemd-socket-activate starts the master on the first connection
        assert d.proc is not None and d.proc.wait(20) == 3
        assert (f"passed fd 3 ('echo') is bound to 127.0.0.1:{other}, but listener 'echo' is "
                f"127.0.0.1:{port} (mode shared)") in d.log()
    finally:
        d.stop()


def test_status_file_lies_are_never_signalled(tmp_path):
    """A status file naming live strangers (sleeps of ours, one posing with a hostile environment)
    takes nothing over and signals nobody."""
    port = free_port()
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    stranger = subprocess.Popen(sleep, cwd=ROOT)
    poser = subprocess.Popen(sleep, cwd=ROOT, env={**os.environ, "UPGRADERD_GENERATION": "1",
                                                   "UPGRADERD_SLOT": "9" * 5000, "LISTEN_FDS": "\u00b2"})
    d = Daemon(tmp_path, echo_config(port, count=1))
    try:
        (tmp_path / "upgraderd.pid.status.json").write_text(
            '{"pid": 4194000, "generations": [{"workers": [{"pid": %d}, {"pid": "x"}, {"pid": -4}, '
            '{"pid": %d}]}]}' % (stranger.pid, poser.pid))
        d.start()
        assert stranger.poll() is None and poser.poll() is None
        assert f"pid {stranger.pid} is not taken over" in d.log()
        assert f"pid {poser.pid} is not taken over: UPGRADERD_SLOT is missing from its environment or " \
            "malformed" in d.log()
        assert "took over" not in d.log()
    finally:
        d.stop()
        for p in (stranger, poser):
            p.kill()
            p.wait()


def test_in_reuseport_mode_a_passed_socket_serves_slot_0_and_the_master_binds_the_rest(tmp_path):
    port = free_port()
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind(("127.0.0.1", port))
    held.listen(64)
    early = socket.create_connection(("127.0.0.1", port), timeout=20)  # queued before any master runs
    wrap = (sys.executable, str(ROOT / "tests" / "fixtures" / "listen_exec.py"), str(held.fileno()), "echo", "--")
    d = Daemon(tmp_path, echo_config(port, count=2), wrap=wrap, pass_fds=(held.fileno(),))
    try:
        d.start()
        held.close()  # the master's copy is the one that counts now
        log = d.log()
        assert "adopted passed fd 3 ('echo') for listener 'echo' slot 0" in log
        assert "listeners open echo" in log
        early.sendall(b"queued")
        assert early.recv(8) == b"queued"
        load = Load("127.0.0.1", port, threads=2, max_seconds=20, max_per_thread=100).start("echo")
        reached = load.wait_for_ok(150)
        result = load.stop()
        assert reached and result.failures == {}, (result.failures, result.examples)
        inodes = {inode for _addr, p, inode in conflict.listening() if p == port}
        assert len(inodes) == 2  # slot 0 passed, slot 1 bound by the master
    finally:
        early.close()
        d.stop()


def test_a_master_whose_workers_bind_for_themselves_is_found_through_them(tmp_path):
    """worker-bind: only the workers hold the sockets; the second master names their master."""
    port = free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Daemon(tmp_path / "a", echo_config(port, mode="worker-bind", count=1))
    second = Daemon(tmp_path / "b", echo_config(port, mode="worker-bind", count=1))
    try:
        first.start()
        (worker,) = first.workers()
        second.start(wait=False)
        assert second.proc is not None and second.proc.wait(20) == 3
        assert (f"another upgraderd master (pid {first.pid}) already serves 127.0.0.1:{port} "
                f"(through its worker pid {worker})") in second.log()
    finally:
        second.stop()
        first.stop()


@needs_root
def test_orphans_running_as_the_workers_user_are_taken_over(tmp_path):
    """workers.user: nobody. The orphans' uid is not ours, but it is the configured one."""
    from tests.e2e.test_privileges import PLAIN_ECHO, interpreter_for
    port = free_port()
    cfg = echo_config(port, count=2)
    cfg["workers"] = {"count": 2, "command": [interpreter_for("nobody"), PLAIN_ECHO], "user": "nobody"}
    d = Daemon(tmp_path, cfg).start()
    orphans: set[int] = set()
    d2 = None
    load = Load("127.0.0.1", port, threads=2, max_seconds=40).start("echo")
    try:
        assert load.wait_for_ok(100)
        orphans = _sigkill(d)
        d2 = Daemon(tmp_path, cfg).start()
        assert f"took over 2 orphaned worker(s) of dead master pid {d.pid}" in d2.log()
        d2.wait_log(r"the orphaned workers have exited")
        assert load.wait_for_ok(load.result.ok + 100)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
    finally:
        load.stop()
        stop_after_restart(orphans, d, d2)


@needs_root
def test_a_daemon_restarted_after_sigkill_takes_over_and_drains_its_orphans(tmp_path):
    """--daemon: the orphans' pidfds survive detaching, and what start-up logged reaches the log file."""
    from tests.e2e.test_daemon_mode import daemon_config, echo_once, kill_tree, upgraderd
    port = free_port()
    config = daemon_config(tmp_path, port, drain={"timeout": "5s", "orphan_grace": "60s"})
    pids: list[int] = []
    orphans: set[int] = set()
    try:
        for _ in range(2):
            r = upgraderd("run", "-c", str(config), "--daemon")
            assert r.returncode == 0, r
            pids.append(int(r.stdout.split("(pid ")[1].split(")")[0]))
            if len(pids) == 1:
                orphans = children(pids[0])
                os.kill(pids[0], signal.SIGKILL)
                wait_until(lambda: not alive(pids[0]), 10, "the first daemon to die")
        log = (tmp_path / "upgraderd.log").read_text()
        assert f"took over 2 orphaned worker(s) of dead master pid {pids[0]}" in log
        # The orphans got their drain signal through a pidfd kept across daemonizing, long
        # before their 60s grace period would have ended.
        wait_until(lambda: not any(alive(p) for p in orphans), 20, "the orphans to drain")
        assert echo_once(port, b"daemon") == b"daemon"
        wait_until(lambda: "the orphaned workers have exited" in (tmp_path / "upgraderd.log").read_text(),
                   10, "the master to see the orphans gone")
    finally:
        for pid in pids:
            kill_tree(pid)
        _kill_all(orphans)
