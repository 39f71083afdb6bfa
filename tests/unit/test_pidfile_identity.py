"""The lock and temporary files refuse what a hostile local user plants; identity is the lock.

Every planted symlink points at a file the test made, and each test checks
that the file's content and mode are exactly as before.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.upgraderd_proc import wait_until
from upgraderd.service import status
from upgraderd.service.pidfile import (
    NotRunning, PidFile, UnsafeFile, find_master, holds_lock, read_pid, send_signal, write_atomic,
)

PRECIOUS = "precious: do not touch\n"


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Path]:
    """A file planted symlinks point at; the test checks it is untouched."""
    t = tmp_path / "victim" / "target.txt"
    t.parent.mkdir()
    t.write_text(PRECIOUS)
    t.chmod(0o600)
    before = t.stat()
    yield t
    after = t.stat()
    assert t.read_text() == PRECIOUS
    assert stat.S_IMODE(after.st_mode) == 0o600 and after.st_mtime_ns == before.st_mtime_ns


def test_lock_symlink_is_refused_and_its_target_untouched(tmp_path: Path, target: Path) -> None:
    (tmp_path / "u.pid.lock").symlink_to(target)
    with pytest.raises(UnsafeFile) as e:
        PidFile(str(tmp_path / "u.pid")).acquire()
    assert str(e.value) == (f"{tmp_path}/u.pid.lock is a symbolic link: refusing to follow it "
                            "(remove it if nothing of yours made it)")


def test_dangling_lock_symlink_is_refused_and_creates_nothing(tmp_path: Path) -> None:
    (tmp_path / "u.pid.lock").symlink_to(tmp_path / "would-be-created")
    with pytest.raises(UnsafeFile):
        PidFile(str(tmp_path / "u.pid")).acquire()
    assert not (tmp_path / "would-be-created").exists()


def test_lock_hard_link_is_refused(tmp_path: Path, target: Path) -> None:
    os.link(target, tmp_path / "u.pid.lock")
    with pytest.raises(UnsafeFile) as e:
        PidFile(str(tmp_path / "u.pid")).acquire()
    assert "has 2 hard links" in str(e.value)


def test_lock_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file owned by another user")
    lock = tmp_path / "u.pid.lock"
    lock.write_text("")
    os.chown(lock, 65534, 65534)
    with pytest.raises(UnsafeFile) as e:
        PidFile(str(tmp_path / "u.pid")).acquire()
    assert str(e.value) == f"{lock} belongs to uid 65534, not to us (uid 0); refusing to use it"


def test_lock_is_created_0644_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        p = PidFile(str(tmp_path / "u.pid"))
        p.acquire()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "u.pid.lock").stat().st_mode) == 0o644
    p.remove()


def test_temp_file_never_opens_what_is_planted_at_its_name(tmp_path: Path, target: Path) -> None:
    path = tmp_path / "u.pid.status.json"
    names = iter(["planted", "fresh"])
    (tmp_path / "u.pid.status.json.planted.tmp").symlink_to(target)
    old = os.umask(0o077)
    try:
        write_atomic(str(path), "{}\n", token=lambda: next(names))
    finally:
        os.umask(old)
    assert path.read_text() == "{}\n" and not path.is_symlink()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["u.pid.status.json", "u.pid.status.json.planted.tmp", "victim"]


def test_symlink_at_the_status_file_is_replaced_not_followed(tmp_path: Path, target: Path) -> None:
    path = tmp_path / "s.json"
    path.symlink_to(target)
    assert status.read(str(path)) is None  # not followed for reading either
    status.write(str(path), {"pid": 1})
    assert not path.is_symlink() and status.read(str(path)) == {"pid": 1}


def test_fifo_at_pidfile_or_status_file_does_not_block_readers(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "u.pid")
    os.mkfifo(tmp_path / "s.json")
    t0 = time.monotonic()
    assert read_pid(str(tmp_path / "u.pid")) is None
    assert status.read(str(tmp_path / "s.json")) is None
    with pytest.raises(NotRunning):
        find_master(str(tmp_path / "u.pid"))
    assert time.monotonic() - t0 < 5  # a hang guard; an open() on a FIFO would block forever


@pytest.mark.parametrize("text", ["\u0663\u0663\n", "+12\n", " 0\n", "1" * 11 + "\n"])
def test_only_ascii_pids_are_read(tmp_path: Path, text: str) -> None:
    (tmp_path / "u.pid").write_text(text)
    assert read_pid(str(tmp_path / "u.pid")) is None


# -- identity: the lock holder, not the command line --

HOLDER = r"""
import fcntl, os, signal, sys, time
lock, pidfile, mark = sys.argv[1:4]
fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
if os.fork():
    os._exit(0)  # as --daemon does: the pid that took the lock is gone, the lock is not
signal.signal(signal.SIGHUP, lambda *a: open(mark, "a").write("HUP\n"))
with open(pidfile + ".tmp", "w") as f:
    f.write(f"{os.getpid()}\n")
os.replace(pidfile + ".tmp", pidfile)
time.sleep(60)
"""

IMPOSTOR = r"""
import signal, sys, time
mark = sys.argv[1]
for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda s, f: open(mark, "a").write(f"{s}\n"))
print("ready", flush=True)
time.sleep(60)
"""


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_the_lock_holder_is_found_after_its_locking_parent_exited(tmp_path: Path) -> None:
    pidfile, mark = tmp_path / "u.pid", tmp_path / "mark"
    subprocess.run([sys.executable, "-c", HOLDER, f"{pidfile}.lock", str(pidfile), str(mark)], check=True)
    pid = int(wait_until(lambda: read_pid(str(pidfile)), 10, "the holder to write its pid"))  # type: ignore[arg-type]
    try:
        assert find_master(str(pidfile)) == pid
        # /proc/locks names the parent that took the lock, which has exited: not a proof.
        ino = os.stat(f"{pidfile}.lock").st_ino
        names = [ln.split()[4] for ln in open("/proc/locks") if f":{ino} " in ln]
        assert names and str(pid) not in names
        send_signal(str(pidfile), pid, signal.SIGHUP)
        wait_until(lambda: mark.exists() and mark.read_text() == "HUP\n", 10, "the holder to get HUP")
    finally:
        _stop(pid)


def test_a_process_named_upgraderd_that_holds_no_lock_is_never_signalled(tmp_path: Path) -> None:
    script = tmp_path / "bin" / "upgraderd"
    script.parent.mkdir()
    script.write_text(IMPOSTOR)
    mark = tmp_path / "mark"
    proc = subprocess.Popen([sys.executable, str(script), str(mark)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        pidfile = tmp_path / "u.pid"
        pidfile.write_text(f"{proc.pid}\n")
        holder = PidFile(str(pidfile))  # the lock exists and is held, by someone else (us)
        holder.acquire()
        with pytest.raises(NotRunning) as e:
            find_master(str(pidfile))
        assert str(e.value) == (f"no master is running: pid {proc.pid} in {pidfile} does not hold "
                                f"{pidfile}.lock (stale pidfile)")
        with pytest.raises(NotRunning):
            send_signal(str(pidfile), proc.pid, signal.SIGTERM)
        assert not holds_lock(proc.pid, f"{pidfile}.lock")
        assert holds_lock(os.getpid(), f"{pidfile}.lock")
        assert proc.poll() is None and not mark.exists()
        holder.remove()
    finally:
        proc.kill()
        proc.wait()


def test_an_unprivileged_client_proves_a_root_master_through_proc_locks() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the master's fds must be hidden from the client")
    d = Path(tempfile.mkdtemp(prefix="upgraderd-identity-"))
    try:
        d.chmod(0o755)  # nobody may read the pidfile, not our fds
        pidfile = d / "u.pid"
        holder = PidFile(str(pidfile))
        holder.acquire()
        holder.write()
        code = ("import sys; from upgraderd.service.pidfile import find_master, NotRunning\n"
                "try: print(find_master(sys.argv[1]))\nexcept NotRunning as e: print(e)")
        argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                sys.executable, "-c", code, str(pidfile)]
        r = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).parents[2])
        if r.returncode != 0:
            pytest.skip(f"nobody cannot run {sys.executable}: {r.stderr[-200:]}")
        assert r.stdout == f"{os.getpid()}\n"  # not through our fds: nobody cannot list them
        sleeper = subprocess.Popen(["sleep", "60"])
        try:
            pidfile.write_text(f"{sleeper.pid}\n")  # a stale pidfile naming another root process
            r = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).parents[2])
            assert r.stdout.startswith(f"no master is running: pid {sleeper.pid} in {pidfile} does not hold")
        finally:
            sleeper.kill()
            sleeper.wait()
        holder.remove()
    finally:
        shutil.rmtree(d)
