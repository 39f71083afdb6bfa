"""The workers' metric files: their names and byte layout (upgraderd's own, version 1).

A built-in worker writes its metrics into files in the directory named by
$UPGRADERD_METRICS_DIR (contract/env.py); the master reads them at scrape
time, sums them over workers, and folds a worker's additive values into its
own memory when it reaps it (metrics/multiproc.py). docs/metrics.md,
"The workers' metric files", is the prose version of this module.

Names: `<type>_<pid>.db`, `<type>` being `counter`, `histogram`, `summary`
or `gauge_<mode>` (MODES: how the master combines one series over workers;
`live*` gauges leave with their worker, the others are folded). One file per
type and process; a forked child opens its own.

Layout, all integers and floats little-endian:

    offset  size  field
    0       4     MAGIC, b"UGM1" (the 1 is the layout's version)
    4       4     used: u32, the bytes in use from offset 0 (header and entries), a multiple of 8
    8       ...   entries, back to back, until `used`

    an entry, starting at a multiple of 8:
    0       4     n: u32, the key's length in bytes, 1..MAX_KEY
    4       n     the key: UTF-8 JSON [metric, sample, {label: value}, help]
    4+n     pad   zero bytes up to the next multiple of 8
    ...     8     the value: f64

An all-zero header means "allocated, nothing written yet". The writer
(apps/metricfile.py) appends an entry the first time a series is set, then
writes `used`, and afterwards overwrites only the 8-byte value in place: an
aligned 8-byte store, so a reader sees the old value or the new one, never a
mix; and `used` never covers an entry that is not written yet.

What a value means, by type (what the master does with it):
- counter: `<metric>_total`, this process's count (summed over workers);
- gauge: `<metric>`, combined by the file's mode (sum, max, min, or `all`,
  which keeps one series per worker with a `pid` label);
- histogram: `<metric>_bucket{le="<upper bound>"}` holds the observations
  that fell in that bucket alone (not cumulative), `<metric>_sum` their sum;
  the master makes the buckets cumulative over the sorted bounds and derives
  `_count` from the `+Inf` bucket, so a writer needs no `_count`;
- summary: `<metric>_count` and `<metric>_sum` (summed).

The reader (metrics/dbfile.py) treats every byte as hostile and checks all
of the above; a file that breaks any of it is set aside, never trusted.
"""

from __future__ import annotations

import json
import re
import struct

MAGIC = b"UGM1"
HEADER = struct.Struct("<4sI")      # magic, used
USED = struct.Struct("<I")          # `used` alone, at USED_AT: what the writer updates after an entry
USED_AT = 4
LENGTH = struct.Struct("<I")        # an entry's key length
VALUE = struct.Struct("<d")         # an entry's value
HEADER_SIZE = 8
MAX_KEY = 4096
SUFFIX = ".db"

GAUGE_MODES = ("all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum")
KINDS = ("counter", "gauge", "histogram", "summary")
# The sample names each type may carry, as suffixes of the metric's name.
SAMPLES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum"),
}
# `<type>_<pid>.db` or `gauge_<mode>_<pid>.db`.
FILE_NAME = re.compile(r"(counter|histogram|summary|gauge_(?:%s))_([0-9]{1,10})\.db\Z" % "|".join(GAUGE_MODES))


def file_name(prefix: str, pid: int) -> str:
    """Return the base name of process `pid`'s file of `prefix` (`counter`, `gauge_livesum`, ...)."""
    return f"{prefix}_{pid}{SUFFIX}"


def key(metric: str, sample: str, labels: dict[str, str], help_text: str) -> str:
    """Return a series' key: the JSON array [metric, sample, labels, help], labels sorted."""
    return json.dumps([metric, sample, labels, help_text], sort_keys=True)


def padded(n: int) -> int:
    """Return the bytes a key of `n` bytes takes with its length field and padding."""
    return (LENGTH.size + n + 7) & ~7


def entry(series: str, value: float = 0.0) -> bytes:
    """Return the bytes of one entry: key length, key, zero padding to 8, value."""
    encoded = series.encode()
    head = LENGTH.pack(len(encoded)) + encoded
    return head + b"\0" * (padded(len(encoded)) - len(head)) + VALUE.pack(value)


def header(used: int) -> bytes:
    """Return the file header for `used` bytes in use."""
    return HEADER.pack(MAGIC, used)
