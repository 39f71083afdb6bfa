"""Request counts from the worker's pen to the master's reader: apps/httpcounts.py and
apps/asgi/reqmetrics.py write them, metrics/requestfiles.py reads them per pid."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from upgraderd.apps import httpcounts
from upgraderd.apps.asgi.reqmetrics import RequestMetrics
from upgraderd.apps.http import Http
from upgraderd.contract import metricformat as layout
from upgraderd.contract.env import METRICS_DIR
from upgraderd.core.requestcounts import RequestCounts
from upgraderd.metrics import requestfiles
from upgraderd.metrics.multiproc import WorkerFiles

INF = float("inf")


def in_thread(fn: object) -> None:
    """Run `fn` in a thread of its own (the counts are per thread), re-raising what it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()  # type: ignore[operator]
        except BaseException as e:  # noqa: BLE001 (handed to the test's thread)
            errors.append(e)
    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert not t.is_alive() and errors == []


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WorkerFiles:
    monkeypatch.setenv(METRICS_DIR, str(tmp_path))
    # A worker's connection counts create and size its files first (connmetrics keeps one sink per
    # process, made in an earlier test's directory): so size them here as it does.
    for prefix in ("counter", "gauge_livesum"):
        fd = os.open(tmp_path / layout.file_name(prefix, os.getpid()), os.O_RDWR | os.O_CREAT, 0o644)
        os.posix_fallocate(fd, 0, 1 << 16)
        os.close(fd)
    return WorkerFiles(str(tmp_path), adopt=True)


def test_the_http_app_counts_its_answers_for_the_master(files: WorkerFiles) -> None:
    def serve() -> None:
        a, b = Http("web"), Http("web")
        assert a.received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3).count(b"200 OK") == 3
        assert b"400 Bad Request" in b.received(b"nonsense\r\n\r\n")
        httpcounts.flush_thread(draining=False)
    in_thread(serve)
    counts = requestfiles.read(files, [os.getpid(), 99999999])
    assert list(counts) == [os.getpid()]                       # a pid without files is left out
    c = counts[os.getpid()]
    assert (c.requests, c.errors) == (4, 0)
    assert c.buckets[0] == (0.001, 4.0)                        # answered within a millisecond
    assert len(c.buckets) == 14 and c.buckets[-1] == (INF, 0.0)


def test_5xx_and_durations_of_the_asgi_counts_read_back(files: WorkerFiles) -> None:
    def serve() -> None:
        m = RequestMetrics(["web", "admin"], True)
        m.request("web", 200, 0.02)
        m.request("web", 503, 0.2)
        m.request("admin", 500, 3.0)
        m.flush({}, False)
    in_thread(serve)
    c = requestfiles.read(files, [os.getpid()])[os.getpid()]
    assert (c.requests, c.errors) == (3, 2)                    # both listeners, 5xx only in errors
    assert {b: n for b, n in c.buckets if n} == {0.025: 1.0, 0.25: 1.0, 5.0: 1.0}
    assert c.quantile(0.5) == pytest.approx(0.1 + 0.15 * 0.5)


def test_a_request_is_in_the_histogram_before_it_is_counted(files: WorkerFiles) -> None:
    """A scrape between a flush's writes must never see more requests counted than durations
    observed (CI: requests_total 17 beside a histogram count of 15): the histogram goes first."""
    seen: list[tuple[float, float]] = []   # (durations observed, requests counted once this add is done)

    class Watched:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def add(self, series: str, delta: float) -> None:
            c = requestfiles.read(files, [os.getpid()])[os.getpid()]
            seen.append((sum(n for _, n in c.buckets), c.requests + delta))
            self.inner.add(series, delta)  # type: ignore[attr-defined]

    def serve() -> None:
        m = RequestMetrics(["web"], True)
        assert m._files is not None
        m._files = (Watched(m._files[0]), *m._files[1:])  # type: ignore[assignment]
        seen.clear()   # the listener's series were added at 0
        for status in (200, 200, 404, 500, 301):
            m.request("web", status, 0.01)
        m.flush({}, False)
        m.request("web", 400, 0.001)
        m.flush({}, False)
    in_thread(serve)
    assert seen[-1] == (6.0, 6.0) and all(observed >= counted for observed, counted in seen), seen


def test_an_untrusted_file_is_skipped_not_followed(files: WorkerFiles, tmp_path: Path) -> None:
    (tmp_path / "counter_4242.db").write_bytes(b"\xff" * 64)
    (tmp_path / "counter_4343.db").symlink_to("/etc/passwd")
    assert requestfiles.read(files, [4242, 4343]) == {}
    assert RequestCounts(1, 1).share() == 1.0
