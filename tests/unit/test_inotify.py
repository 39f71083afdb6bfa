"""system/inotify.py on the real kernel: the ways files really change, seen from the watched directories."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support import kubelet
from upgraderd.system.inotify import FileWatcher, dirs_for, fingerprint


def test_nothing_happening_reads_no_event(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("a")
    w = FileWatcher()
    try:
        assert w.watch([str(cfg)]) == []
        assert w.changed() is False
    finally:
        w.close()


def test_rename_over_the_file_is_seen_and_changes_the_content_hash(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("a")
    w = FileWatcher()
    try:
        w.watch([str(cfg)])
        before = w.fingerprint(str(cfg), content=True)
        (tmp_path / ".c.yaml.swp").write_text("b")
        os.rename(tmp_path / ".c.yaml.swp", cfg)
        assert w.changed() is True
        assert w.fingerprint(str(cfg), content=True) not in ("", before)
        assert w.changed() is False, "the events were drained"
    finally:
        w.close()


def test_a_configmap_data_swap_is_seen_though_the_file_is_never_written(tmp_path: Path) -> None:
    mount = tmp_path / "config"
    kubelet.project(mount, {"upgraderd.yaml": "v1"}, "2026_01_01_00_00_00.1")
    cfg = str(mount / "upgraderd.yaml")
    w = FileWatcher()
    try:
        w.watch([cfg])
        before = w.fingerprint(cfg, content=True)
        kubelet.project(mount, {"upgraderd.yaml": "v2"}, "2026_01_01_00_01_00.2")
        assert w.changed() is True
        assert w.fingerprint(cfg, content=True) != before
        w.watch([cfg])   # the old timestamped directory is gone: the watch follows the new target
        kubelet.project(mount, {"upgraderd.yaml": "v3"}, "2026_01_01_00_02_00.3")
        assert w.changed() is True
    finally:
        w.close()


def test_a_current_symlink_switch_changes_the_fingerprint(tmp_path: Path) -> None:
    for r in ("r1", "r2"):
        (tmp_path / r).mkdir()
    current = tmp_path / "current"
    current.symlink_to("r1")
    w = FileWatcher()
    try:
        w.watch([str(current)])
        before = w.fingerprint(str(current), content=False)
        (tmp_path / "current.tmp").symlink_to("r2")
        os.rename(tmp_path / "current.tmp", current)
        assert w.changed() is True
        assert w.fingerprint(str(current), content=False) not in ("", before)
    finally:
        w.close()


def test_writes_inside_a_watched_release_directory_change_nothing(tmp_path: Path) -> None:
    (tmp_path / "r1").mkdir()
    current = tmp_path / "current"
    current.symlink_to("r1")
    before = fingerprint(str(current), content=False)
    (tmp_path / "r1" / "worker.pid").write_text("123")   # what a worker may write: untrusted, no reload
    (tmp_path / "r1" / "cache").mkdir()
    assert fingerprint(str(current), content=False) == before
    assert dirs_for(str(current)) == {str(tmp_path)}


def test_a_missing_directory_is_watched_through_its_nearest_ancestor(tmp_path: Path) -> None:
    target = tmp_path / "srv" / "app" / "current"
    assert dirs_for(str(target)) == {str(tmp_path)}
    w = FileWatcher()
    try:
        w.watch([str(target)])
        (tmp_path / "srv").mkdir()
        assert w.changed() is True
        w.watch([str(target)])
        (tmp_path / "srv" / "app").mkdir()
        assert w.changed() is True
        w.watch([str(target)])
        target.write_text("x")
        assert w.changed() is True
        assert fingerprint(str(target), content=False) != ""
    finally:
        w.close()


def test_a_fifo_in_place_of_the_config_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    assert fingerprint(str(fifo), content=True).startswith(str(fifo))   # metadata only, no open()
    assert fingerprint(str(tmp_path / "missing"), content=True) == ""


def test_only_events_on_the_way_to_a_watched_path_count(tmp_path):
    """Issue 25: a busy file next to the config pushed a real edit's debounce back forever."""
    from upgraderd.system.inotify import FileWatcher
    config = tmp_path / "upgraderd.yaml"
    config.write_text("a")
    w = FileWatcher()
    try:
        assert w.watch([str(config)]) == []
        (tmp_path / "busy.log").write_text("x")
        (tmp_path / "busy.log").write_text("y")
        assert w.changed() is False
        config.write_text("b")
        assert w.changed() is True
    finally:
        w.close()


def test_the_names_that_matter_follow_the_symlinks(tmp_path):
    from upgraderd.system.inotify import names
    (tmp_path / "..2024").mkdir()
    (tmp_path / "..2024" / "upgraderd.yaml").write_text("a")
    (tmp_path / "..data").symlink_to("..2024")
    (tmp_path / "upgraderd.yaml").symlink_to("..data/upgraderd.yaml")
    found = names(str(tmp_path / "upgraderd.yaml"))
    assert found[str(tmp_path)] == {"upgraderd.yaml", "..data", "..2024"}
    assert found[str(tmp_path / "..2024")] == {"upgraderd.yaml"}
    # A loop stops after MAX_HOPS links, and a missing entry ends the walk with its own name.
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    assert names(str(tmp_path / "a"))[str(tmp_path)] == {"a", "b"}
    assert names(str(tmp_path / "gone" / "x"))[str(tmp_path)] == {"gone"}


def test_a_symlink_loop_is_logged_once(tmp_path, caplog):
    import logging
    from upgraderd.system.inotify import FileWatcher
    caplog.set_level(logging.WARNING, logger="upgraderd")
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    w = FileWatcher()
    try:
        for _ in range(3):
            assert w.fingerprint(str(tmp_path / "a"), False) == ""
        assert sum("symlink loop" in r.getMessage() for r in caplog.records) == 1
    finally:
        w.close()
