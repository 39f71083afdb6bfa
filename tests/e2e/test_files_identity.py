"""The real daemon and CLI against planted symlinks and pidfiles that name the wrong process.

Each planted symlink points at a file the test made; the test checks that its
content and mode are exactly as before. A process that must not be signalled
records every signal it gets in a file, which must stay absent.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.upgraderd_proc import Daemon, echo_config, free_port, ROOT, text_of, wait_until

pytestmark = pytest.mark.e2e

PRECIOUS = "precious: do not touch\n"

IMPOSTOR = r"""
import signal, sys, time
mark = sys.argv[1]
for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
    signal.signal(sig, lambda s, f: open(mark, "a").write(f"{s}\n"))
print("ready", flush=True)
time.sleep(120)
"""


def upgraderd(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real command line."""
    return subprocess.run([sys.executable, "-m", "upgraderd", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL)


def plant_target(tmp_path: Path) -> tuple[Path, os.stat_result]:
    t = tmp_path / "victim.txt"
    t.write_text(PRECIOUS)
    t.chmod(0o600)
    return t, t.stat()


def assert_untouched(t: Path, before: os.stat_result) -> None:
    after = t.stat()
    assert t.read_text() == PRECIOUS
    assert stat.S_IMODE(after.st_mode) == 0o600
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


def test_symlink_at_the_lock_refuses_the_start(tmp_path: Path) -> None:
    target, before = plant_target(tmp_path)
    d = Daemon(tmp_path, echo_config(free_port(), count=1))
    Path(f"{d.pidfile}.lock").symlink_to(target)
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 3
    assert f"upgraderd: {d.pidfile}.lock is a symbolic link: refusing to follow it" in d.log()
    assert_untouched(target, before)
    assert not d.pidfile.exists()


def test_symlinks_at_the_pidfile_and_status_file_are_replaced_not_followed(tmp_path: Path) -> None:
    target, before = plant_target(tmp_path)
    d = Daemon(tmp_path, echo_config(free_port(), count=1))
    status_path = Path(f"{d.pidfile}.status.json")
    d.pidfile.symlink_to(target)
    status_path.symlink_to(target)
    with d.start(wait=False):
        # The temporary names older versions used (PATH.PID.tmp), planted while the
        # master is still importing: nothing may open them now that names are random.
        old_names = [Path(f"{p}.{d.pid}.tmp") for p in (d.pidfile, status_path)]
        for name in old_names:
            name.symlink_to(target)
        d.wait_log(r"serving: generation 1 ACTIVE")
        d.hup()
        assert d.settled() == 2
        for p in (d.pidfile, status_path):
            assert not p.is_symlink() and stat.S_IMODE(p.stat().st_mode) == 0o644
        assert d.pidfile.read_text() == f"{d.pid}\n"
        # Only the planted names stay: the master's own temporary file (random name) lives
        # between its write and its rename, and generation 1 retiring now is one such write.
        planted = sorted(n.name for n in old_names)
        wait_until(lambda: sorted(n for n in os.listdir(tmp_path) if n.endswith(".tmp")) == planted, 10,
                   "no temporary file but the planted ones")
        assert all(n.is_symlink() for n in old_names)
        assert upgraderd("status", "--pidfile", str(d.pidfile)).returncode == 0
    assert_untouched(target, before)


@pytest.fixture
def impostor(tmp_path: Path):
    """A live process whose argv[0] ends in /upgraderd and that records any signal it gets."""
    script = tmp_path / "bin" / "upgraderd"
    script.parent.mkdir()
    script.write_text(IMPOSTOR)
    mark = tmp_path / "signalled"
    proc = subprocess.Popen([sys.executable, str(script), str(mark)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    yield proc.pid, mark
    assert proc.poll() is None, "the impostor died"
    proc.kill()
    proc.wait()


def test_stale_pidfile_naming_a_process_called_upgraderd_is_not_signalled(tmp_path: Path, impostor) -> None:
    pid, mark = impostor
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[1].endswith(b"/upgraderd")
    with Daemon(tmp_path, echo_config(free_port(), count=1)).start() as d:
        # The master writes its pidfile just after it logs "serving": overwrite it only then.
        wait_until(lambda: (text_of(d.pidfile) or "").strip() == str(d.pid), 10, "the master's pidfile")
        d.pidfile.write_text(f"{pid}\n")  # stale: the lock is held, by the real master
        why = f"no master is running: pid {pid} in {d.pidfile} does not hold {d.pidfile}.lock (stale pidfile)"
        # LSB: `stop` of a stopped service succeeds, `status` says 3, the others 7 (not running).
        for cmd, code in ((["reload"], 7), (["stop"], 0), (["stop", "--fast"], 0), (["status"], 3)):
            r = upgraderd(*cmd, "--pidfile", str(d.pidfile))
            assert r.returncode == code, r
            assert (r.stdout + r.stderr).endswith(f"{why}\n" if code else f"already stopped ({why})\n"), r
        assert not mark.exists()
        assert d.status()["hups"] == 0 and "graceful stop" not in d.log()


def test_pidfile_naming_another_instances_master_is_not_signalled(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with Daemon(tmp_path / "a", echo_config(free_port(), count=1)).start() as a, \
            Daemon(tmp_path / "b", echo_config(free_port(), count=1)).start() as b:
        wait_until(lambda: (text_of(a.pidfile) or "").strip() == str(a.pid), 10, "A's pidfile")
        a.pidfile.write_text(f"{b.pid}\n")
        for cmd, code in ((["reload"], 7), (["stop"], 0), (["status"], 3)):
            r = upgraderd(*cmd, "--pidfile", str(a.pidfile))
            assert r.returncode == code, r
            assert f"pid {b.pid} in {a.pidfile} does not hold {a.pidfile}.lock" in r.stdout + r.stderr
        assert b.status()["hups"] == 0 and "graceful stop" not in b.log()
        assert a.status()["hups"] == 0
        # B's own pidfile still reaches B: the check refuses strangers, not masters.
        r = upgraderd("reload", "--pidfile", str(b.pidfile))
        assert r.returncode == 0, r
        assert r.stdout == "reload done: generation 2 ACTIVE\n"
        r = upgraderd("stop", "--pidfile", str(b.pidfile))
        assert r.returncode == 0 and r.stdout == f"stopped (pid {b.pid})\n", r
        assert b.proc is not None and b.proc.wait(10) == 0
        assert a.proc is not None and a.proc.poll() is None


HOSTILE = [  # (edit of the working config, key path in the located error)
    (("app: echo", 'app: echo\n  env: {A: "x\\0y"}'), "workers.env"),
    (("app: echo", 'command: ["/bin/true", "a\\0b"]'), "workers.command"),
    (("app: echo", 'app: echo\n  user: "\u0663"'), "workers.user"),
    (("app: echo", 'app: echo\n  group: "\u00b2"'), "workers.group"),
    (("timeout: 10s", "timeout: 1" + "0" * 400), "ready.timeout"),
    (("timeout: 10s", "timeout: 99999999999999999999h"), "ready.timeout"),
    (("host: 127.0.0.1", 'host: "::1%a\\0"'), "listeners[0].host"),
]


def echo_once(port: int) -> bytes:
    """Send one line to the echo listener and return the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"ping\n")
        return c.recv(64)


def test_hostile_configs_on_reload_are_rejected_with_checks_location(tmp_path: Path) -> None:
    port = free_port()
    with Daemon(tmp_path, echo_config(port, count=1)).start() as d:
        text = d.config_path.read_text()
        for (old, new), key in HOSTILE:
            assert old in text
            d.write_config(text.replace(old, new, 1))
            r = upgraderd("check", "-c", str(d.config_path))
            assert r.returncode == 1, (new, r)
            located = r.stderr.splitlines()[0]
            assert located.startswith(f"{d.config_path}:") and f": {key}: " in located, located
            r = upgraderd("reload", "--pidfile", str(d.pidfile))
            assert r.returncode == 1 and located in r.stderr, (new, r)
            assert echo_once(port) == b"ping\n"
        d.write_config(text)
        assert upgraderd("reload", "--pidfile", str(d.pidfile)).returncode == 0
        wait_until(lambda: d.status()["reloads"] == {"success": 1, "failed": 0, "rejected": len(HOSTILE)},
                   10, "the status file to count every reload")
        assert d.proc is not None and d.proc.poll() is None
    assert d.proc.returncode == 0
