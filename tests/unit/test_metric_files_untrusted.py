"""Worker-written metric files are untrusted: every corruption is bounded, set aside and counted.

Each case starts from a real file (the workers' own writer, apps/metricfile.py),
corrupts it in one way, and checks that folding and collecting neither raise nor spend
more than 100 ms of CPU, that the good workers' counts are still all there,
and that the bad file left the scrape set and was counted once, by reason.
CPU time of the working thread is measured (not wall time), so a loaded
machine does not make the bound flaky; a hang fails after a deadline instead
of hanging the run.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.support.mpworkers import WorkerFactory
from upgraderd.apps import metricfile
from tests.support.scrape import fetch, parse, value
from upgraderd.config.schema import MetricsSpec
from upgraderd.metrics import dbfile
from upgraderd.metrics.dbfile import BadFile
from upgraderd.metrics.multiproc import WorkerFiles
from upgraderd.metrics.telemetry import Telemetry

ACCEPTED = ("upgraderd_connections_accepted_total", (("listener", "web"),))
BAD_PID = 4242
KEY = metricfile.key("upgraderd_connections_accepted", "upgraderd_connections_accepted_total",
                     {"listener": "web"}, "Connections accepted.")


def sums(files: WorkerFiles) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in files.collect() for s in m.samples}


# CPU seconds a fold or a collect may take here. The reader gives up after
# dbfile.TIME_BUDGET (50 ms, wall); what these tests guard against is the
# unbounded case (a loop that never ends, 12 s freezes), so the bound leaves
# room for a loaded 2-core CI machine. The figures are bench/metric_files.py's.
STALL = 0.5


def bounded(fn: Callable[[], object]) -> float:
    """Run `fn` in a thread; fail if it raises or has not returned within 10 s; return its CPU seconds."""
    out: dict[str, object] = {}

    def run() -> None:
        t0 = time.thread_time()
        try:
            fn()
        except BaseException as e:  # reported below, in the test's thread
            out["error"] = e
        out["cpu"] = time.thread_time() - t0
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "did not return within 10 s"
    assert "error" not in out, out["error"]
    return float(out["cpu"])  # type: ignore[arg-type]


def write_db(path: Path, entries: list[tuple[str, float]]) -> None:
    """Write a real metric file with the workers' own writer."""
    with open(path, "wb") as f:
        f.truncate(1 << 16)
    d = metricfile.MetricFile(str(path))
    for key, v in entries:
        d.add(key, v)
    d.map.close()
    os.close(d.fd)


def entry_size(key: str) -> int:
    n = len(key.encode())
    return (4 + n + 7) // 8 * 8 + 8


def used_of(p: Path) -> int:
    return struct.unpack_from("<I", p.read_bytes(), 4)[0]


# Each corruption: (name, function(path) that damages a real file, expected reason).
def looping_length(p: Path) -> None:
    data = bytearray(p.read_bytes())
    # As a signed int, -24: a reader doing signed arithmetic would step back to this entry forever.
    struct.pack_into("<I", data, 8 + entry_size(KEY), (1 << 32) - 24)
    p.write_bytes(bytes(data))


def non_json_key(p: Path) -> None:
    bad = b"{not json at all" + b" " * 8
    data = bytearray(p.read_bytes())
    body = struct.pack("<I", len(bad)) + bad + b"\0" * (-(len(bad) + 4) % 8) + struct.pack("<d", 1.0)
    used = used_of(p)
    data[used:used + len(body)] = body
    struct.pack_into("<I", data, 4, used + len(body))
    p.write_bytes(bytes(data))


def nan_value(p: Path) -> None:
    data = bytearray(p.read_bytes())
    struct.pack_into("<d", data, 8 + entry_size(KEY) - 8, math.nan)  # the first entry's value
    p.write_bytes(bytes(data))


def huge_used(p: Path) -> None:
    with open(p, "r+b") as f:
        f.seek(4)
        f.write(struct.pack("<I", 256 << 20))
        f.truncate(300 << 20)  # sparse: a reader that trusts the header reads 256 MB


def truncated(p: Path) -> None:
    os.truncate(p, used_of(p) - 10)  # mid-entry: the header promises more than the file holds


def planted_symlink(p: Path) -> None:
    target = p.parent.parent / "precious"
    target.write_text("never read, never moved")
    p.unlink()
    p.symlink_to(target)


def wrong_key_shape(p: Path) -> None:
    # Valid JSON and a valid entry, but a histogram bucket whose `le` is not a number:
    # prometheus-client's merge raises ValueError on it at every scrape.
    p.unlink()
    write_db(p, [(json.dumps(["h", "h_bucket", {"le": "1.0"}, "x"]), 1.0),
                 (json.dumps(["h", "h_bucket", {"le": "lots"}, "x"]), 1.0)])


def nested_key(p: Path) -> None:
    # Valid JSON nested deeper than Python's recursion limit: json.loads raises RecursionError.
    p.unlink()
    write_db(p, [(KEY, 1.0), ("[" * 2000 + "]" * 2000, 1.0)])


def foreign_layout(p: Path) -> None:
    # prometheus-client's multiprocess layout (int32 `used`, padding, entries): not ours.
    raw = KEY.encode()
    body = struct.pack("i", len(raw)) + raw + b" " * (8 - (len(raw) + 4) % 8) + struct.pack("dd", 7.0, 0.0)
    p.write_bytes(struct.pack("i", 8 + len(body)) + b"\0" * 4 + body)


def fifo(p: Path) -> None:
    p.unlink()
    os.mkfifo(p)  # an open() without O_NONBLOCK would wait for a writer forever


CASES = [
    ("counter", looping_length, "entry"),
    ("counter", non_json_key, "key"),
    ("counter", nan_value, "value"),
    ("counter", huge_used, "size"),
    ("counter", truncated, "size"),
    ("counter", planted_symlink, "unreadable"),
    ("histogram", wrong_key_shape, "key"),
    ("counter", nested_key, "key"),
    ("counter", foreign_layout, "format"),
    ("gauge_livesum", fifo, "unreadable"),
]


@pytest.fixture
def setup(tmp_path):
    d = tmp_path / "mp"
    files = WorkerFiles(str(d))
    factory = WorkerFactory(str(d))
    good = factory.run(connections=5)
    yield files, factory, d, good
    factory.close()
    files.close()


@pytest.mark.parametrize("prefix,damage,reason", CASES, ids=[c[1].__name__ for c in CASES])
def test_a_corrupt_file_is_set_aside_and_counted_at_scrape(setup, prefix, damage, reason):
    files, _, d, good = setup
    bad = d / f"{prefix}_{BAD_PID}.db"
    write_db(bad, [(KEY, 7.0), (KEY.replace("web", "other"), 1.0)])
    damage(bad)
    assert bounded(lambda: files.collect()) < STALL
    assert sums(files)[ACCEPTED] == 5  # the good worker is all there, the bad one not at all
    assert files.rejected[reason] == 1 and sum(files.rejected.values()) == 1
    assert not bad.exists() and not bad.is_symlink()
    assert (d / f"{bad.name}.rejected").exists() or (d / f"{bad.name}.rejected").is_symlink()
    assert bounded(lambda: files.fold(good)) < STALL
    assert sums(files)[ACCEPTED] == 5
    if damage is planted_symlink:
        assert (d.parent / "precious").read_text() == "never read, never moved"


@pytest.mark.parametrize("prefix,damage,reason", CASES, ids=[c[1].__name__ for c in CASES])
def test_a_dead_workers_corrupt_file_is_set_aside_and_counted_at_fold(setup, prefix, damage, reason):
    files, _, d, good = setup
    bad = d / f"{prefix}_{BAD_PID}.db"
    write_db(bad, [(KEY, 7.0), (KEY.replace("web", "other"), 1.0)])
    damage(bad)
    assert bounded(lambda: files.fold(BAD_PID)) < STALL
    assert files.rejected[reason] == (0 if prefix == "gauge_livesum" else 1)  # live gauges are only dropped
    assert not bad.exists()
    assert sums(files)[ACCEPTED] == 5


def test_a_file_with_too_many_entries_is_refused_within_the_budget(setup):
    files, _, d, _ = setup
    bad = d / f"counter_{BAD_PID}.db"
    write_db(bad, [(KEY.replace("web", f"l{i}"), 1.0) for i in range(dbfile.MAX_ENTRIES + 1)])
    assert bounded(lambda: files.collect()) < STALL
    assert files.rejected["entry"] == 1
    assert sums(files)[ACCEPTED] == 5


def test_a_worker_cannot_forge_the_archive(setup):
    files, factory, d, good = setup
    files.fold(good)
    forged = d / "counter_archive.db"
    write_db(forged, [(KEY, 1e6)])
    assert sums(files)[ACCEPTED] == 5  # not a worker file name: never read
    files.fold(factory.run(connections=2))
    assert sums(files)[ACCEPTED] == 7
    assert forged.exists()  # and not the master's to delete either


def test_an_older_masters_truncated_archive_is_adopted_without_mmap(tmp_path):
    d = tmp_path / "mp"
    d.mkdir()
    archive = d / "counter_archive.db"
    write_db(archive, [(KEY, 9.0)])
    os.truncate(archive, 20)  # mmapped, this is a SIGBUS waiting for the next access
    files = WorkerFiles.adopt({"path": str(d), "private": False})
    assert ACCEPTED not in sums(files)
    assert not archive.exists()
    write_db(d / "counter_archive.db", [(KEY, 9.0)])
    assert sums(WorkerFiles.adopt({"path": str(d), "private": False}))[ACCEPTED] == 9


def test_the_archive_never_overflows_to_infinity(setup):
    files, _, d, _ = setup
    for pid in (5001, 5002):
        write_db(d / f"counter_{pid}.db", [(KEY, 1e308)])
        files.fold(pid)
    assert math.isfinite(sums(files)[ACCEPTED])


def test_metrics_answers_200_and_counts_the_bad_file(tmp_path):
    d = tmp_path / "mp"
    t = Telemetry.start(MetricsSpec(listen="127.0.0.1:0", dir=str(d)), lambda: None, time.monotonic)
    assert t is not None
    try:
        write_db(d / f"counter_{BAD_PID}.db", [(KEY, 3.0)])
        write_db(d / "counter_4243.db", [(KEY, 4.0)])
        non_json_key(d / f"counter_{BAD_PID}.db")
        for _ in range(3):
            status, body, _ = fetch(f"http://{t.server.address}/metrics")
            assert status == 200
            s = parse(body)
            assert value(s, "upgraderd_connections_accepted_total", listener="web") == 4
            assert value(s, "upgraderd_metric_files_rejected_total", reason="key") == 1
    finally:
        t.close()


def test_an_unwritable_directory_disables_worker_metrics_but_not_the_master(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    files = WorkerFiles(str(blocker / "mp"))  # ENOTDIR, for root as for anyone
    assert not files.enabled
    assert list(files.collect()) == []
    files.fold(1)
    assert "workers' metrics disabled" in caplog.text


def real_file_bytes() -> bytes:
    if not REAL:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "counter_1.db"
            write_db(p, [(KEY, 3.0), (KEY.replace("web", "x"), 4.0)])
            REAL.append(p.read_bytes()[:600])
    return REAL[0]


REAL: list[bytes] = []


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, 400), st.binary(min_size=1, max_size=8)), max_size=6),
       cut=st.integers(0, 600))
def test_any_damage_to_a_real_file_reads_or_raises_badfile(edits, cut):
    data = bytearray(real_file_bytes())
    for at, chunk in edits:
        data[at:at + len(chunk)] = chunk
    data = data[:cut]
    try:
        entries = dbfile.parse(bytes(data), "counter")
    except BadFile:
        return
    assert all(math.isfinite(v) and v >= 0 for _, v in entries)


def test_concurrent_scrapes_set_a_bad_file_aside_and_count_it_once(setup):
    files, _, d, _ = setup
    for i in range(20):
        bad = d / f"counter_{BAD_PID + i}.db"
        write_db(bad, [(KEY, 7.0), (KEY.replace("web", "other"), 1.0)])
        non_json_key(bad)
    barrier = threading.Barrier(8)
    seen: list[float] = []

    def scrape() -> None:
        barrier.wait(10)
        seen.append(sums(files)[ACCEPTED])
    threads = [threading.Thread(target=scrape) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == [5.0] * 8
    assert files.rejected["key"] == 20
    assert len([p for p in d.iterdir() if p.name.endswith(".rejected")]) == 20


def test_the_archive_is_bounded_however_many_series_dead_workers_invent(setup, monkeypatch):
    from upgraderd.metrics import multiproc
    monkeypatch.setattr(multiproc, "MAX_ARCHIVE_KEYS", 50)
    files, _, d, good = setup
    files.fold(good)  # its series are archived first, and keep counting
    own = sum(len(keys) for keys in files._archive.values())   # the good worker's counter series
    for pid in range(6000, 6003):
        write_db(d / f"counter_{pid}.db", [(KEY.replace("web", f"x{pid}-{i}"), 1.0) for i in range(40)])
        files.fold(pid)
    series = [s for m in files.collect() for s in m.samples]
    assert len(series) <= 50
    assert 0 < own < 50
    assert files.dropped_keys == 3 * 40 - (50 - own)
    assert sums(files)[ACCEPTED] == 5
