"""The workers' metric file writer against the layout docs/metrics.md documents, byte for byte.

The expected bytes are built here from the documented layout with `struct`
alone, not with upgraderd's helpers, so that a change of the layout in
contract/metricformat.py fails here until the documentation (and this
second implementation) follows.
"""

from __future__ import annotations

import json
import math
import os
import struct

import pytest

from upgraderd.apps import metricfile
from upgraderd.metrics import dbfile
from upgraderd.metrics.families import merge
from upgraderd.metrics.dbfile import FileName

SERIES = [
    ("upgraderd_connections_accepted", {"listener": "web"}, "Connections accepted.", [0, 3, 4]),
    ("upgraderd_bytes_sent", {"listener": "wéb"}, "Bytes \"sent\".", [0, 1e6]),
    ("upgraderd_handoff_failures", {"reason": "refused"}, "x" * 300, [0, 1]),
]


def documented(entries: list[tuple[str, float]], size: int) -> bytes:
    """Return a file as docs/metrics.md describes it: magic, used, then aligned entries."""
    body = b""
    for key, value in entries:
        raw = key.encode()
        head = struct.pack("<I", len(raw)) + raw
        body += head + b"\0" * (-len(head) % 8) + struct.pack("<d", value)
    out = b"UGM1" + struct.pack("<I", 8 + len(body)) + body
    return out + b"\0" * (size - len(out))


def test_the_bytes_are_the_documented_layout(tmp_path):
    path = tmp_path / "counter_1.db"
    with open(path, "wb") as f:
        f.truncate(1 << 16)
    f_ours = metricfile.MetricFile(str(path))
    want = []
    for metric, labels, help_text, deltas in SERIES:
        key = metricfile.key(metric, metric + "_total", labels, help_text)
        assert json.loads(key) == [metric, metric + "_total", labels, help_text]
        for d in deltas:
            f_ours.add(key, d)
        want.append((key, float(sum(deltas))))
    assert path.read_bytes() == documented(want, 1 << 16)
    samples = dbfile.read_file(str(path), "counter")
    assert sorted(v for _key, v in samples) == [1.0, 7.0, 1e6]


def test_a_file_grows_when_its_series_outgrow_it(tmp_path):
    path = tmp_path / "gauge_livesum_2.db"
    with open(path, "wb") as f:
        f.write(b"stale bytes of an earlier process with this pid")
        f.truncate(4096)
    f_ours = metricfile.MetricFile(str(path))
    keys = [metricfile.key("upgraderd_connections_active", "upgraderd_connections_active",
                           {"listener": f"l{i}", "state": "active"}, "h" * 100) for i in range(40)]
    for i, key in enumerate(keys):
        f_ours.add(key, i)
        f_ours.add(key, 1)
    assert os.path.getsize(path) == 16384   # 40 entries of about 220 bytes: doubled twice
    samples = dbfile.read_file(str(path), "gauge")
    assert sorted(v for _key, v in samples) == [float(i + 1) for i in range(40)]


def test_one_file_per_path_and_process(tmp_path):
    path = tmp_path / "counter_3.db"
    with open(path, "wb") as f:
        f.truncate(1 << 16)
    assert metricfile.shared(str(path)) is metricfile.shared(str(path))
    metricfile.shared(str(path)).add("k", 2)
    metricfile.shared(str(path)).add("k", 3)
    assert metricfile.shared(str(path)).values == {"k": 5.0}


def _histogram_file(tmp_path, pid, observations):
    """Write what a worker timing requests writes: per-bucket counts and the sum."""
    path = tmp_path / f"histogram_{pid}.db"
    with open(path, "wb") as f:
        f.truncate(1 << 16)
    f_ours = metricfile.MetricFile(str(path))
    bounds = (0.1, 1.0, math.inf)
    name, help_text = "app_request_duration_seconds", "Request durations."
    for b in bounds:   # every bucket at 0 first, as a worker creates its series
        f_ours.add(metricfile.key(name, name + "_bucket", {"le": repr(b) if b != math.inf else "+Inf",
                                                          "status": "2xx"}, help_text), 0)
    for x in observations:
        b = next(b for b in bounds if x <= b)
        f_ours.add(metricfile.key(name, name + "_bucket", {"le": repr(b) if b != math.inf else "+Inf",
                                                          "status": "2xx"}, help_text), 1)
        f_ours.add(metricfile.key(name, name + "_sum", {"status": "2xx"}, help_text), x)
    return FileName("histogram", "histogram", "", pid), dbfile.read_file(str(path), "histogram")


def test_histogram_buckets_add_up_over_workers_and_turn_cumulative(tmp_path):
    reading = [_histogram_file(tmp_path, 1, [0.05, 0.5, 3.0]), _histogram_file(tmp_path, 2, [0.05, 0.07])]
    [family] = merge(reading, {"histogram": {}})
    got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert family.type == "histogram"
    assert got == {
        ("app_request_duration_seconds_bucket", "0.1"): 3.0,
        ("app_request_duration_seconds_bucket", "1.0"): 4.0,
        ("app_request_duration_seconds_bucket", "+Inf"): 5.0,
        ("app_request_duration_seconds_count", None): 5.0,
        ("app_request_duration_seconds_sum", None): got[("app_request_duration_seconds_sum", None)],
    }
    assert math.isclose(got[("app_request_duration_seconds_sum", None)], 3.67)
    assert all(s.labels["status"] == "2xx" for s in family.samples)


def test_a_file_made_but_never_allocated_is_an_oserror_not_a_crash(tmp_path, monkeypatch):
    """A full tmpfs leaves connmetrics' file at 0 bytes; the request metrics opening it after
    must get the OSError they handle (metrics off), not mmap's ValueError that killed the worker."""
    from upgraderd.apps import metricfile as mf
    from upgraderd.apps.asgi import reqmetrics
    from upgraderd.contract import metricformat as layout
    from upgraderd.contract.env import METRICS_DIR
    for kind in ("counter", "gauge_livesum"):
        (tmp_path / layout.file_name(kind, os.getpid())).write_bytes(b"")
    with pytest.raises(OSError):
        mf.MetricFile(str(tmp_path / layout.file_name("counter", os.getpid())))
    monkeypatch.setenv(METRICS_DIR, str(tmp_path))
    assert reqmetrics._open_files() is None
