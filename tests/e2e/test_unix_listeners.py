"""Unix socket listeners: the master holds the socket file across reloads and USR2.

Real clients speak HTTP over AF_UNIX (tests/support/loadgen.py `Load(unix=...)`)
while the master is HUPed 10 times and then upgraded with USR2: not one request
may fail, for the built-in http app and for gunicorn (config/examples/unix_socket.yaml).
The socket file keeps its inode through all of it and is removed at a clean stop.
A stale file is replaced with a warning; a live socket, a file that is no socket, a
symlink and a missing directory are refused with exit 3 and left as they were. A
real nginx (config/examples/nginx_unix.conf) proxies to the socket through reloads.
The socket outlives the master as a TCP one does: taken over from orphaned workers,
passed by socket activation, or kept in the fd store.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.fdstore import FdStoreStandIn
from tests.support.loadgen import Load
from tests.support.reloads import EXAMPLES, Report, reload_under_load
from tests.support.scrape import scrape, value
from tests.support.upgraderd_proc import Daemon, alive, stop_after_restart, free_port, wait_until

pytestmark = pytest.mark.e2e

RELOADS = 10


def unix_config(path: Path, app: str = "http", count: int = 2) -> dict[str, object]:
    return {"listeners": [{"name": "web", "path": str(path)}],
            "workers": {"count": count, "app": app},
            "ready": {"timeout": "10s"}, "drain": {"timeout": "10s"}}


def gunicorn_config(path: Path) -> dict[str, object]:
    cfg = yaml.safe_load((EXAMPLES / "unix_socket.yaml").read_text())
    cfg["listeners"][0]["path"] = str(path)
    return cfg  # type: ignore[no-any-return]


def file_id(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode), f"{path} is not a socket"
    return st.st_dev, st.st_ino


def http_get(path: Path) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def assert_zero_drop(report: Report, reloads: int) -> None:
    result = report.result
    assert result.failures == {}, (result.failures, result.examples)
    assert len(report.generations) == reloads
    for gen in report.generations:
        assert report.stale[gen] == {}, f"generation {gen}: answers from an old generation"
        assert report.fresh[gen] > 0


def hups_then_usr2(d: Daemon, sock: Path) -> None:
    """RELOADS HUPs, then a USR2, each under HTTP load over the socket: nothing fails, the file stays."""
    before = file_id(sock)
    report = reload_under_load(d, 0, RELOADS, load=Load("", 0, threads=4, max_seconds=600, unix=str(sock)))
    assert_zero_drop(report, RELOADS)
    gen = report.generations[-1]
    load = Load("", 0, threads=4, max_seconds=120, unix=str(sock)).start("http")
    try:
        assert load.wait_for_ok(20)
        d.send(signal.SIGUSR2)
        d.wait_log(r"upgraded the master in place")
        d.wait_log(rf"reload done: generation {gen + 1} ACTIVE", timeout=60)
        d.wait_log(rf"generation {gen} DRAINING -> RETIRED", timeout=60)
        mark = load.mark()
        wait_until(lambda: any(b.startswith(f"generation={gen + 1} ") for b in load.answers_since(mark)),
                   30, "answers from the generation after USR2")
    finally:
        result = load.stop()
    assert result.failures == {}, (result.failures, result.examples)
    assert file_id(sock) == before, "the socket file was replaced"
    assert "removed socket file" not in d.log()
    print(f"\n{report.result.ok + result.ok} requests over {RELOADS} HUPs and a USR2, no failure")


def assert_clean_stop_removes(d: Daemon, sock: Path) -> None:
    assert d.stop() == 0
    assert not os.path.lexists(sock), "the socket file survived a clean stop"
    assert f"removed socket file {sock}" in d.log()


def test_http_app_on_a_unix_socket_through_hups_and_usr2(tmp_path):
    sock = tmp_path / "app.sock"
    with Daemon(tmp_path, unix_config(sock)).start() as d:
        assert http_get(sock).startswith(b"HTTP/1.1 200")
        hups_then_usr2(d, sock)
        assert_clean_stop_removes(d, sock)


@pytest.mark.skipif(shutil.which("gunicorn", path=str(Path(".venv/bin").absolute())) is None
                    and shutil.which("gunicorn") is None, reason="gunicorn is not installed")
def test_gunicorn_on_a_unix_socket_through_hups_and_usr2(tmp_path):
    sock = tmp_path / "app.sock"
    with Daemon(tmp_path, gunicorn_config(sock)).start() as d:
        assert b"server=gunicorn" in http_get(sock)
        hups_then_usr2(d, sock)
        assert "SIGKILL" not in d.log()
        assert_clean_stop_removes(d, sock)


def test_uvicorn_example_serves_the_unix_socket_through_reloads(tmp_path):
    """config/examples/uvicorn.yaml moved to a path: uvicorn_server.py keeps the fd's real family.

    (Plain `uvicorn --fd 3` serves the socket too, but loses requests at each drain, as
    it does on TCP: docs/workers.md, "uvicorn".)
    """
    sock = tmp_path / "app.sock"
    cfg = yaml.safe_load((EXAMPLES / "uvicorn.yaml").read_text())
    cfg["listeners"] = [{"name": "web", "path": str(sock)}]
    cfg.pop("metrics", None)
    with Daemon(tmp_path, cfg).start() as d:
        assert b"server=uvicorn" in http_get(sock)
        report = reload_under_load(d, 0, 5, load=Load("", 0, threads=4, max_seconds=300, unix=str(sock)))
        assert_zero_drop(report, 5)
        assert "SIGKILL" not in d.log()
        assert_clean_stop_removes(d, sock)


def test_open_connections_on_the_unix_socket_move_to_the_next_generation(tmp_path):
    """drain.handoff auto: the built-in echo app hands each live AF_UNIX connection over."""
    sock = tmp_path / "app.sock"
    cfg = unix_config(sock, app="echo")
    cfg["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
    with Daemon(tmp_path, cfg).start() as d:
        load = Load("", 0, threads=8, max_seconds=120, unix=str(sock)).start("echo-keepalive")
        try:
            assert load.wait_for_ok(200)
            for n in (2, 3, 4):
                d.reload_to(n)
                d.wait_log(rf"generation {n - 1} DRAINING -> RETIRED")
                assert load.wait_for_ok(load.result.ok + 100)
        finally:
            result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        wait_until(lambda: value(scrape(cfg), "upgraderd_connections_taken_over_total", listener="web") == 24,
                   10, "24 connections taken over")
        assert value(scrape(cfg), "upgraderd_connections_handed_off_total", listener="web") == 24
        assert "SIGKILL" not in d.log()


def test_permissions_status_and_a_reload_that_changes_them(tmp_path):
    sock = tmp_path / "app.sock"
    cfg = unix_config(sock, count=1)
    cfg["listeners"][0]["permissions"] = "0640"  # type: ignore[index]
    cfg["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
    with Daemon(tmp_path, cfg).start() as d:
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o640
        assert http_get(sock).startswith(b"HTTP/1.1 200")
        assert f"plan: listeners open web {sock} (shared); workers 1" in d.log()
        st = d.status()
        assert st is not None and st["listeners"] == [{"name": "web", "address": str(sock), "mode": "shared"}]
        assert value(scrape(cfg), "upgraderd_listener_info", name="web", address=str(sock), mode="shared",
                     protocol="unix") == 1
        # A reload that keeps the listener keeps the file, and applies its new permissions.
        before = file_id(sock)
        cfg["listeners"][0]["permissions"] = "0600"  # type: ignore[index]
        d.write_config(cfg)
        d.reload_to(2)
        assert file_id(sock) == before
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
        assert f"changed listeners[{sock}].permissions: 0640 -> 0600; generation new" in d.log()
        assert f"socket file {sock}: permissions now 0600" in d.log()
        assert_clean_stop_removes(d, sock)


def test_a_reload_that_adds_a_live_path_is_rejected_and_serving_goes_on(tmp_path):
    sock, taken = tmp_path / "app.sock", tmp_path / "taken.sock"
    cfg = unix_config(sock, count=1)
    with Daemon(tmp_path, cfg).start() as d, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(taken))
        live.listen(1)
        cfg["listeners"].append({"name": "more", "path": str(taken)})  # type: ignore[attr-defined]
        d.write_config(cfg)
        d.send(signal.SIGHUP)
        d.wait_log(rf"reload failed, still serving generation 1: .*cannot listen on {re.escape(str(taken))}: "
                   r"a live socket is there")
        assert http_get(sock).startswith(b"HTTP/1.1 200")
        assert file_id(taken) is not None
        assert_clean_stop_removes(d, sock)
        assert os.path.lexists(taken)   # never ours


def test_a_stale_socket_file_is_replaced_with_a_warning(tmp_path):
    sock = tmp_path / "app.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()                      # the file stays; nothing listens on it
    with Daemon(tmp_path, unix_config(sock, count=1)).start() as d:
        assert f"replaced stale socket file {sock} (nothing listened on it)" in d.log()
        assert http_get(sock).startswith(b"HTTP/1.1 200")
        assert_clean_stop_removes(d, sock)


def start_refused(tmp_path: Path, sock: Path) -> str:
    """Start a master that must refuse to start; return its log (exit code 3 asserted)."""
    d = Daemon(tmp_path, unix_config(sock, count=1)).start(wait=False)
    try:
        assert d.proc is not None
        assert d.proc.wait(30) == 3, d.log()
    finally:
        d.stop()
    log = d.log()
    assert "generation 1" not in log
    return log


def test_a_live_socket_of_another_process_is_refused(tmp_path):
    sock = tmp_path / "app.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(sock))
        live.listen(8)
        before = file_id(sock)
        log = start_refused(tmp_path, sock)
        assert (f"cannot listen on {sock}: a live socket is there: another process listens on it "
                f"(held by pid {os.getpid()}); stop it or choose another path") in log, log
        assert file_id(sock) == before
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(sock))       # still ours, still listening
        assert live.accept()[0] is not None


def test_a_second_master_on_the_same_path_is_refused(tmp_path):
    sock = tmp_path / "app.sock"
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    with Daemon(tmp_path / "one", unix_config(sock, count=1)).start() as first:
        log = start_refused(tmp_path / "two", sock)
        assert f"cannot listen on {sock}: a live socket is there" in log
        held = re.search(r"\(held by pid ([0-9, ]+)\)", log)
        assert held is not None and str(first.pid) in held.group(1).split(", "), log
        assert http_get(sock).startswith(b"HTTP/1.1 200")
        assert first.proc is not None and first.proc.poll() is None


@pytest.mark.parametrize("kind", ["regular file", "symlink", "directory"])
def test_a_path_that_is_no_socket_is_refused_and_left_alone(tmp_path, kind):
    sock = tmp_path / "app.sock"
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    if kind == "regular file":
        sock.write_text("keep me too\n")
    elif kind == "symlink":
        sock.symlink_to(target)
    else:
        sock.mkdir()
    log = start_refused(tmp_path, sock)
    assert f"cannot listen on {sock}: the path exists and is not a socket (a {kind})" in log, log
    assert target.read_text() == "keep me\n"
    if kind == "regular file":
        assert sock.read_text() == "keep me too\n"
    elif kind == "symlink":
        assert sock.is_symlink() and os.readlink(sock) == str(target)
    else:
        assert sock.is_dir()


def test_a_missing_directory_is_a_clear_error(tmp_path):
    sock = tmp_path / "no-such-dir" / "app.sock"
    log = start_refused(tmp_path, sock)
    assert f"cannot listen on {sock}: directory {sock.parent} does not exist" in log, log
    assert not sock.parent.exists()


def test_a_world_writable_directory_without_sticky_bit_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    sock = shared / "app.sock"
    log = start_refused(tmp_path, sock)
    assert "is writable by every user and has no sticky bit" in log, log
    assert not os.path.lexists(sock)


def test_usr2_keeps_the_file_and_a_killed_master_leaves_it(tmp_path):
    sock = tmp_path / "app.sock"
    with Daemon(tmp_path, unix_config(sock, count=1)).start() as d:
        before = file_id(sock)
        d.send(signal.SIGUSR2)
        d.wait_log(r"reload done: generation 2 ACTIVE")
        assert file_id(sock) == before
        workers = d.workers()
        d.send(signal.SIGKILL)
        assert d.proc is not None
        d.proc.wait(10)
        # No clean stop, so the file stays; its orphaned worker still serves it.
        assert file_id(sock) == before
        assert http_get(sock).startswith(b"HTTP/1.1 200")
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not any(alive(p) for p in workers), 10, "the orphaned worker to exit")
    # Now nothing listens: the next master replaces the stale file.
    with Daemon(tmp_path, unix_config(sock, count=1)).start() as d:
        assert f"replaced stale socket file {sock}" in d.log()
        assert_clean_stop_removes(d, sock)


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/test-deps installs nginx-light)")
def test_nginx_in_front_of_the_unix_socket_through_reloads(tmp_path):
    sock = tmp_path / "app.sock"
    port = free_port()
    block = (EXAMPLES / "nginx_unix.conf").read_text()
    block = block.replace("/tmp/upgraderd-app/app.sock", str(sock)).replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    assert str(sock) in block and f"127.0.0.1:{port}" in block
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    temps = "\n".join(f"    {k}_temp_path {prefix}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\n"
        + "events { worker_connections 256; }\n"
        + f"http {{\n    access_log off;\n{temps}\n{block}\n}}\n")
    with Daemon(tmp_path, unix_config(sock)).start() as d:
        nginx = subprocess.Popen([str(NGINX), "-p", str(prefix), "-c", str(conf)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            def up() -> bool:
                assert nginx.poll() is None, nginx.stderr.read().decode() if nginx.stderr else ""
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    return False
                return True
            wait_until(up, 20, "nginx to listen")
            report = reload_under_load(d, port, 5, load=Load("127.0.0.1", port, threads=4, max_seconds=300))
        finally:
            nginx.send_signal(signal.SIGQUIT)   # stopped by its pid
            try:
                nginx.wait(15)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait()
        assert_zero_drop(report, 5)
        errors = (prefix / "error.log").read_text() if (prefix / "error.log").exists() else ""
        assert not re.search(r"\[(error|crit)\]", errors), errors
        assert_clean_stop_removes(d, sock)


@pytest.mark.skipif(os.geteuid() != 0, reason="pidfd_getfd needs ptrace rights over the orphans: root")
def test_a_restarted_master_takes_the_socket_over_from_its_orphans(tmp_path):
    sock = tmp_path / "app.sock"
    cfg = unix_config(sock)
    d = Daemon(tmp_path, cfg).start()
    before = file_id(sock)
    orphans: set[int] = set()
    d2 = None
    load = Load("", 0, threads=2, max_seconds=60, unix=str(sock)).start("http")
    try:
        assert load.wait_for_ok(50)
        orphans = d.workers()
        d.send(signal.SIGKILL)
        assert d.proc is not None
        d.proc.wait(10)
        d2 = Daemon(tmp_path, cfg).start()
        log = d2.log()
        assert f"took over 2 orphaned worker(s) of dead master pid {d.pid}" in log
        assert re.search(rf"adopted fd 3 of orphan pid \d+ for listener 'web' slot 0 \({re.escape(str(sock))}\)", log)
        assert "stale socket file" not in log and "cannot listen" not in log
        d2.wait_log(r"the orphaned workers have exited")
        assert load.wait_for_ok(load.result.ok + 50)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        assert file_id(sock) == before
        assert_clean_stop_removes(d2, sock)   # the dead master's file is the new one's to remove
    finally:
        load.stop()
        stop_after_restart(orphans, d, d2)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate missing (scripts/test-deps installs it)")
def test_a_socket_activated_master_serves_the_passed_unix_socket_and_leaves_its_file(tmp_path):
    sock = tmp_path / "app.sock"
    wrap = ("systemd-socket-activate", "-l", str(sock), "--fdname=web",
            "-E", "PYTHONUNBUFFERED=1", "-E", f"TMPDIR={tmp_path}")
    d = Daemon(tmp_path, unix_config(sock), wrap=wrap).start(wait=False)
    try:
        wait_until(lambda: "Listening on" in d.log(), 10, "systemd-socket-activate to listen")
        # The first client wakes the master and waits in the passed socket's queue.
        assert http_get(sock).startswith(b"HTTP/1.1 200")
        d.wait_log(r"serving: generation 1 ACTIVE")
        assert f"adopted passed fd 3 ('web') for listener 'web' slot 0 ({sock})" in d.log()
        assert "stale socket file" not in d.log()
        d.reload_to(2)
        assert http_get(sock).startswith(b"HTTP/1.1 200")
        assert d.stop() == 0
        assert os.path.lexists(sock), "the file of a passed socket belongs to whoever passed it"
        assert "removed socket file" not in d.log()
    finally:
        d.stop()


def test_a_master_restarted_with_the_socket_from_the_fd_store_loses_nothing(tmp_path):
    """The fd store keeps the Unix socket while no master and no worker runs."""
    sock = tmp_path / "app.sock"
    cfg = unix_config(sock)
    store = FdStoreStandIn(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": store.path}
    d = Daemon(tmp_path, cfg, env=env).start()
    orphans: set[int] = set()
    d2 = None
    load = Load("", 0, threads=2, max_seconds=60, unix=str(sock)).start("http")
    try:
        wait_until(lambda: sorted(store.names()) == ["web"], 10, "the socket in the fd store")
        assert load.wait_for_ok(50)
        orphans = d.workers()
        d.send(signal.SIGKILL)
        assert d.proc is not None
        d.proc.wait(10)
        for pid in orphans:
            os.kill(pid, signal.SIGTERM)   # what a service manager's stop does to the rest of the cgroup
        wait_until(lambda: not any(alive(p) for p in orphans), 10, "the orphans to drain")
        # Nobody accepts now; requests wait in the stored socket's queue.
        wrap, fds = store.wrap()
        d2 = Daemon(tmp_path, cfg, env=env, wrap=wrap, pass_fds=fds).start()
        assert f"adopted passed fd 3 ('web') for listener 'web' slot 0 ({sock})" in d2.log()
        assert "stale socket file" not in d2.log()
        assert load.wait_for_ok(load.result.ok + 50)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        assert sorted(store.names()) == ["web"]
    finally:
        load.stop()
        stop_after_restart(orphans, d, d2)
        store.close()
