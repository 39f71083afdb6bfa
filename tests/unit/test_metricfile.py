"""The workers' metric file writer against prometheus-client's own, byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import ROOT
from upgraderd.apps import metricfile
from upgraderd.metrics import dbfile

SERIES = [
    ("upgraderd_connections_accepted", {"listener": "web"}, "Connections accepted.", [0, 3, 4]),
    ("upgraderd_bytes_sent", {"listener": "wéb"}, "Bytes \"sent\".", [0, 1e6]),
    ("upgraderd_handoff_failures", {"reason": "refused"}, "x" * 300, [0, 1]),
]

LIBRARY = """
import sys
from prometheus_client import Counter
for metric, labels, help_text, deltas in {series!r}:
    c = Counter(metric, help_text, list(labels), registry=None).labels(**labels)
    for d in deltas:
        c.inc(d)
"""


def test_the_bytes_are_prometheus_clients(tmp_path):
    lib, ours = tmp_path / "lib", tmp_path / "ours"
    lib.mkdir()
    ours.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(lib)}
    subprocess.run([sys.executable, "-c", LIBRARY.format(series=SERIES)], env=env, cwd=ROOT, check=True,
                   timeout=60)
    [lib_file] = list(lib.iterdir())
    path = ours / "counter_1.db"
    with open(path, "wb") as f:
        f.truncate(1 << 16)
    f_ours = metricfile.MetricFile(str(path))
    for metric, labels, help_text, deltas in SERIES:
        key = metricfile.key(metric, metric + "_total", labels, help_text)
        for d in deltas:
            f_ours.add(key, d)
    assert path.read_bytes() == lib_file.read_bytes()
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
    assert os.path.getsize(path) == 16384   # 40 entries of about 230 bytes: doubled twice
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
