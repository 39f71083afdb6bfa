"""A bounded, validating reader of the workers' metric files (contract/metricformat.py).

Workers run application code and can write anything into these files, so the
master treats them as untrusted input: a length field could point backwards
(a reader that followed it would loop forever), a huge `used` header ask for
gigabytes, a key be something other than JSON, a NaN stick in a counter.
This reader instead:

- opens with O_NOFOLLOW and O_NONBLOCK (a symlink or a FIFO planted under a
  metric file's name is refused, never followed or waited on) and reads only
  regular files, with `read()`, never `mmap` (a file truncated under an mmap
  kills the reader with SIGBUS);
- reads at most `MAX_BYTES`, and refuses a `used` header beyond the file
  size or that cap;
- walks entries with offsets that must move forward and stay inside `used`,
  at most `MAX_ENTRIES` of them, and gives up past a time budget;
- refuses a file whose header is not upgraderd's (MAGIC, version 1), such as
  a prometheus-client multiprocess file;
- accepts only keys of the shape `[metric, sample, {label: value}, help]`
  with valid Prometheus names, whose sample name fits the file's metric type,
  and only finite values (non-negative in counter files).

Any violation raises `BadFile` with a short, bounded `reason` (a metric label)
and a detail for the log. Nothing else escapes `read_file`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import time
from dataclasses import dataclass

from upgraderd.contract import metricformat as layout

MAX_BYTES = 1 << 20
MAX_ENTRIES = 1024  # a built-in worker writes six per listener
MAX_KEY = layout.MAX_KEY
# A file that a well-formed worker wrote parses in well under a millisecond per
# hundred entries; past this budget the file is set aside instead of stalling the loop.
# The budget is the reading thread's CPU time, not wall time: on a loaded machine the
# thread waits for a core, and a wall-clock budget set aside well-formed files (and
# their counts) for time the file did not cost.
TIME_BUDGET = 0.05

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
GAUGE_MODES = layout.GAUGE_MODES
_LENGTH, _VALUE = layout.LENGTH, layout.VALUE   # bound once: _entry runs per entry

Key = tuple[str, str, tuple[tuple[str, str], ...], str]  # metric, sample, sorted labels, help


class BadFile(Exception):
    """A metric file that must not be trusted; `reason` is a bounded label value."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class FileName:
    """What a metric file's name says: its metric type, gauge mode and writer's pid."""

    prefix: str  # "counter", "gauge_livesum", ...
    kind: str    # "counter", "gauge", "histogram", "summary"
    mode: str    # the gauge's multiprocess mode, "" for other types
    pid: int


def parse_name(name: str) -> FileName | None:
    """Return what the base name of a worker's metric file says, or None if it is not one."""
    m = layout.FILE_NAME.match(name)
    if m is None:
        return None
    prefix = m.group(1)
    kind, _, mode = prefix.partition("_")
    return FileName(prefix, kind, mode, int(m.group(2)))


def read_file(path: str, kind: str, cache: dict[bytes, Key] | None = None,
              budget: float = TIME_BUDGET) -> list[tuple[Key, float]]:
    """Return the validated (key, value) entries of the metric file at `path`; raise BadFile."""
    data = _read_bounded(path)
    if len(data) == 0:
        return []  # created but not sized yet: holds nothing
    return parse(data, kind, cache, budget)


def _read_bounded(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise
        raise BadFile("unreadable", f"cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadFile("unreadable", "not a regular file")
        chunks, want = [], min(st.st_size, MAX_BYTES)
        while want > 0:
            chunk = os.read(fd, want)
            if not chunk:
                break
            chunks.append(chunk)
            want -= len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise BadFile("unreadable", f"cannot read: {e.strerror}") from None
    finally:
        os.close(fd)


def parse(data: bytes, kind: str, cache: dict[bytes, Key] | None = None,
          budget: float = TIME_BUDGET) -> list[tuple[Key, float]]:
    """Return the validated entries of a metric file's bytes; raise BadFile."""
    if len(data) < layout.HEADER_SIZE:
        raise BadFile("size", f"{len(data)} bytes, shorter than the {layout.HEADER_SIZE}-byte header")
    magic, used = layout.HEADER.unpack_from(data, 0)
    if magic == b"\0\0\0\0" and used == 0:
        return []  # sized, header not written yet
    if magic != layout.MAGIC:
        raise BadFile("format", f"not an upgraderd metric file (magic {magic!r}, want {layout.MAGIC!r})")
    if used < layout.HEADER_SIZE or used > len(data) or used % 8:
        raise BadFile("size", f"header says {used} bytes used, the file holds {len(data)}"
                      f"{' (read cap)' if len(data) == MAX_BYTES else ''}")
    cache = {} if cache is None else cache
    deadline = time.thread_time() + budget
    out: list[tuple[Key, float]] = []
    pos = layout.HEADER_SIZE
    while pos < used:
        if len(out) >= MAX_ENTRIES:
            raise BadFile("entry", f"more than {MAX_ENTRIES} entries")
        if len(out) % 64 == 63 and time.thread_time() > deadline:
            raise BadFile("slow", f"not parsed within {budget * 1000:.0f} ms of CPU")
        key, value, pos = _entry(data, pos, used, kind, cache)
        out.append((key, value))
    return out


def _entry(data: bytes, pos: int, used: int, kind: str, cache: dict[bytes, Key]) -> tuple[Key, float, int]:
    """Return the entry at `pos` and the offset of the next one."""
    if pos + 4 > used:
        raise BadFile("entry", f"truncated length field at offset {pos}")
    n = _LENGTH.unpack_from(data, pos)[0]
    if n <= 0 or n > MAX_KEY:
        raise BadFile("entry", f"key length {n} at offset {pos}")
    value_at = pos + ((4 + n + 7) & ~7)   # layout.padded(n), inline
    end = value_at + 8
    if end > used:
        raise BadFile("entry", f"entry at offset {pos} ends at {end}, past the {used} bytes used")
    raw = data[pos + 4:pos + 4 + n]
    key = cache.get(raw)
    if key is None:
        key = _key(raw, kind, pos)
        if len(cache) > 8 * MAX_ENTRIES:
            cache.clear()  # a churn of distinct keys must not grow the master
        cache[raw] = key
    value = _VALUE.unpack_from(data, value_at)[0]
    if not math.isfinite(value):
        raise BadFile("value", f"{value} for {key[1]} at offset {pos}")
    if kind == "counter" and value < 0:
        raise BadFile("value", f"negative counter {value} for {key[1]} at offset {pos}")
    return key, value, end


def _key(raw: bytes, kind: str, pos: int) -> Key:
    """Return a key checked to have the shape contract/metricformat.py gives `kind`."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadFile("key", f"key at offset {pos} is not UTF-8 JSON of a sane depth") from None
    if not (isinstance(doc, list) and len(doc) == 4 and all(isinstance(x, str) for x in (doc[0], doc[1], doc[3]))
            and isinstance(doc[2], dict)):
        raise BadFile("key", f"key at offset {pos} is not [metric, sample, labels, help]")
    metric, sample, labels, help_text = doc
    if not _NAME.match(metric) or not _NAME.match(sample):
        raise BadFile("key", f"invalid metric name {metric[:80]!r} / {sample[:80]!r} at offset {pos}")
    if not any(sample == metric + s for s in layout.SAMPLES.get(kind, ())):
        raise BadFile("key", f"sample {sample[:80]!r} does not belong to {kind} {metric[:80]!r}")
    for k, v in labels.items():
        if not (isinstance(v, str) and _LABEL.match(k) and not k.startswith("__") and k != "pid"):
            raise BadFile("key", f"invalid label {str(k)[:80]!r} at offset {pos}")
    if kind == "histogram" and sample == metric + "_bucket":
        _check_le(labels.get("le"), pos)
    return metric, sample, tuple(sorted(labels.items())), help_text


def _check_le(le: object, pos: int) -> None:
    try:
        ok = isinstance(le, str) and not math.isnan(float(le))
    except ValueError:
        ok = False
    if not ok:
        raise BadFile("key", f"histogram bucket without a numeric le at offset {pos}")
