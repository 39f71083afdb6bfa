"""Folding dead workers' metric files: sums stay exact and monotonic, the directory stays small."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from tests.support.mpworkers import WorkerFactory
from upgraderd.metrics.multiproc import WorkerFiles


def sums(files: WorkerFiles) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in files.collect() for s in m.samples}


ACCEPTED = ("upgraderd_connections_accepted_total", (("listener", "web"),))
RECEIVED = ("upgraderd_bytes_received_total", (("listener", "web"),))
OPEN = ("upgraderd_connections_active", (("listener", "web"), ("state", "active")))


@pytest.fixture
def factory(tmp_path):
    f = WorkerFactory(str(tmp_path / "mp"))
    yield f
    f.close()


def test_folding_keeps_every_count_in_one_archive(tmp_path, factory):
    files = WorkerFiles(str(tmp_path / "mp"))
    total = 0
    for i in range(1, 21):
        pid = factory.run(connections=i, nbytes=10)
        total += i
        assert sums(files)[ACCEPTED] == total  # the dead worker's file still counts
        files.fold(pid)
        assert sums(files)[ACCEPTED] == total  # and now the archive does, exactly once
        assert os.listdir(files.path) == []  # the archive is in memory
    assert sums(files)[RECEIVED] == total * 10
    assert files.folded == 20
    files.close()


def test_a_dead_workers_open_connections_leave_the_gauge(tmp_path, factory):
    files = WorkerFiles(str(tmp_path / "mp"))
    pid = factory.run(connections=5, still_open=3)
    assert sums(files)[OPEN] == 3
    files.fold(pid)
    assert OPEN not in sums(files)
    assert sums(files)[ACCEPTED] == 5


def test_scrapes_during_folds_never_see_a_count_twice_or_not_at_all(tmp_path, factory):
    files = WorkerFiles(str(tmp_path / "mp"))
    pids = [factory.run(connections=1) for _ in range(40)]
    seen: list[float] = []
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            seen.append(sums(files)[ACCEPTED])
    t = threading.Thread(target=scrape)
    t.start()
    try:
        for pid in pids:
            files.fold(pid)
    finally:
        done.set()
        t.join(30)
    assert len(seen) > 0
    assert set(seen) == {40.0}
    assert os.listdir(files.path) == []  # the archive is in memory


def test_a_file_left_empty_by_a_killed_worker_is_skipped_then_dropped(tmp_path):
    files = WorkerFiles(str(tmp_path / "mp"))
    empty = tmp_path / "mp" / "counter_4242.db"
    empty.touch()
    assert list(files.collect()) == []
    files.fold(4242)
    assert not empty.exists()


def test_a_configured_directory_is_created_and_only_its_metric_files_wiped(tmp_path):
    d = tmp_path / "metrics"
    d.mkdir()
    (d / "counter_1.db").write_bytes(b"\0" * 64)
    (d / "gauge_livesum_2.db.rejected").write_bytes(b"\0" * 64)
    (d / "histogram_archive.db").write_bytes(b"\0" * 64)  # an older master's archive
    (d / "notes.txt").write_text("not ours")
    (d / "app.db").write_text("not ours either")
    (d / "counter_x.db").write_text("nor this")
    files = WorkerFiles(str(d))
    assert sorted(os.listdir(d)) == ["app.db", "counter_x.db", "notes.txt"]
    files.close()
    assert d.is_dir()
    WorkerFiles(str(tmp_path / "new" / "dir")).close()
    assert (tmp_path / "new" / "dir").is_dir()


def test_a_private_directory_is_removed_on_close():
    files = WorkerFiles()
    assert os.path.isdir(files.path)
    files.close()
    assert not os.path.exists(files.path)


def test_a_reexeced_master_adopts_the_archive_and_live_files(tmp_path, factory):
    files = WorkerFiles()
    f2 = WorkerFactory(files.path)
    try:
        files.fold(f2.run(connections=7))
        live = f2.run(connections=2)  # exits, but is folded only by the next master
        data = json.loads(json.dumps(files.export()))  # as the re-exec passes it
        adopted = WorkerFiles.adopt(data)
        assert adopted.path == files.path and adopted.private
        assert sums(adopted)[ACCEPTED] == 9
        adopted.fold(live)
        adopted.fold(f2.run(connections=1))
        assert sums(adopted)[ACCEPTED] == 10
        assert os.listdir(adopted.path) == []
        adopted.close()
        assert not os.path.exists(files.path)
    finally:
        f2.close()


THREADS_SCRIPT = """
from upgraderd.apps.connmetrics import ConnectionMetrics
a, b = ConnectionMetrics(["web"]), ConnectionMetrics(["web"])   # two Servers of one worker
for _ in range(3):
    a.accepted("web")
for _ in range(4):
    b.accepted("web")
b.closed("web")
a.flush(); b.flush(); a.flush()
b.draining(); b.flush()
"""


def test_servers_of_one_threaded_worker_add_up_instead_of_overwriting(tmp_path):
    files = WorkerFiles(str(tmp_path / "mp"))
    env = {**os.environ, "UPGRADERD_METRICS_DIR": files.path}
    subprocess.run([sys.executable, "-c", THREADS_SCRIPT], env=env, check=True, timeout=60)
    s = sums(files)
    assert s[ACCEPTED] == 7
    assert s[("upgraderd_connections_closed_total", (("listener", "web"),))] == 1
    assert s[OPEN] == 3
    assert s[("upgraderd_connections_active", (("listener", "web"), ("state", "draining")))] == 3
