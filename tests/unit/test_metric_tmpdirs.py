"""Private metrics directories of dead masters are removed at start; nothing else is."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from upgraderd.metrics import tmpdirs


def dead_pid() -> int:
    """Return the pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(30)
    return p.pid


def test_only_real_directories_of_dead_masters_owned_by_us_are_removed(tmp_path):
    gone = tmp_path / f"upgraderd-metrics-{dead_pid()}-abc123"
    gone.mkdir()
    (gone / "counter_1.db").write_bytes(b"x")
    alive = tmp_path / f"upgraderd-metrics-{os.getppid()}-abc123"
    alive.mkdir()
    old_style = tmp_path / "upgraderd-metrics-k2j4h5"  # an older upgraderd: no pid in the name
    old_style.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep")
    link = tmp_path / f"upgraderd-metrics-{dead_pid()}-link"
    link.symlink_to(victim)
    assert tmpdirs.clean_stale(str(tmp_path)) == 1
    assert not gone.exists()
    assert alive.is_dir() and old_style.is_dir() and link.is_symlink()
    assert (victim / "precious").read_text() == "keep"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_another_users_directory_is_left_alone(tmp_path):
    theirs = tmp_path / f"upgraderd-metrics-{dead_pid()}-theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    assert tmpdirs.clean_stale(str(tmp_path)) == 0
    assert theirs.is_dir()


def test_a_private_directory_is_named_after_its_master(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tmpdirs.tempfile, "tempdir", None)
    path = tmpdirs.make_private()
    try:
        assert os.path.basename(path).startswith(f"upgraderd-metrics-{os.getpid()}-")
        assert tmpdirs.clean_stale(str(tmp_path)) == 0  # our own, and we are alive
    finally:
        tmpdirs.remove_private(path)
