"""Sum the workers' validated metric entries into Prometheus metric families.

Input: (file name, entries) pairs, the entries already validated by
dbfile.py, plus the archive of dead workers' additive values. Output:
prometheus-client `Metric` objects (its public exposition API) for the
master's registry. How each type combines over workers is stated in
contract/metricformat.py; in short:

- counter, summary and `sum`/`livesum` gauge series are summed;
- `max`/`livemax` and `min`/`livemin` gauges take the largest or smallest;
- `all`/`liveall` gauges keep one series per worker, labelled `pid`
  ("archive" for what dead workers left);
- histogram buckets are per-bucket counts: they are summed per bound, then
  made cumulative over the sorted bounds, and `_count` is the `+Inf` total.

A metric name written as two types (or two gauge modes) keeps the first
seen; the other's series are dropped, so one worker's mistake cannot break
the scrape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client.metrics_core import Metric

from upgraderd.metrics.dbfile import FileName, Key

Labels = tuple[tuple[str, str], ...]
Reading = list[tuple[FileName, list[tuple[Key, float]]]]


def le_text(bound: float) -> str:
    """Return a bucket bound as the `le` label shows it ("+Inf", "0.25", "1.0")."""
    return "+Inf" if bound == math.inf else "-Inf" if bound == -math.inf else repr(bound)


class _Family:
    """One metric's series as they add up over the files."""

    def __init__(self, name: str, help_text: str, kind: str, mode: str) -> None:
        self.name, self.help, self.kind, self.mode = name, help_text, kind, mode
        self.values: dict[tuple[str, Labels], float] = {}
        self.buckets: dict[Labels, dict[float, float]] = {}

    def add(self, sample: str, labels: Labels, value: float, pid: int) -> None:
        """Combine one entry of worker `pid` (0: the archive) into the family."""
        if self.kind == "histogram" and sample == self.name + "_bucket":
            rest = tuple(kv for kv in labels if kv[0] != "le")
            bound = float(dict(labels)["le"])   # dbfile checked it is a number
            by_bound = self.buckets.setdefault(rest, {})
            by_bound[bound] = by_bound.get(bound, 0.0) + value
            return
        if self.kind == "gauge" and self.mode in ("all", "liveall"):
            labels = labels + (("pid", str(pid) if pid else "archive"),)
        series = (sample, labels)
        before = self.values.get(series)
        if before is None:
            self.values[series] = value
        elif self.kind == "gauge" and self.mode in ("max", "livemax"):
            self.values[series] = max(before, value)
        elif self.kind == "gauge" and self.mode in ("min", "livemin"):
            self.values[series] = min(before, value)
        elif self.kind == "gauge" and self.mode in ("all", "liveall"):
            self.values[series] = value
        else:
            self.values[series] = before + value

    def metric(self) -> Metric:
        """Return the family as a prometheus-client `Metric`."""
        out = Metric(self.name, self.help, self.kind)
        for (sample, labels), value in self.values.items():
            if not (sample == self.name + "_count" and labels in self.buckets):
                out.add_sample(sample, dict(labels), value)
        for labels, by_bound in self.buckets.items():
            total = 0.0
            for bound in sorted(by_bound):
                total += by_bound[bound]
                out.add_sample(self.name + "_bucket", {**dict(labels), "le": le_text(bound)}, total)
            out.add_sample(self.name + "_count", dict(labels), total)
        return out


def merge(reading: Reading, archive: dict[str, dict[Key, float]]) -> list[Metric]:
    """Combine validated file entries and the archive into metric families."""
    families: dict[str, _Family] = {}
    rows: list[tuple[FileName, Iterable[tuple[Key, float]]]] = list(reading)
    for prefix, values in archive.items():
        kind, _, mode = prefix.partition("_")
        rows.append((FileName(prefix, kind, mode, 0), values.items()))
    for name, entries in rows:
        for (metric, sample, labels, help_text), value in entries:
            family = families.get(metric)
            if family is None:
                family = families[metric] = _Family(metric, help_text, name.kind, name.mode)
            elif (family.kind, family.mode) != (name.kind, name.mode):
                continue
            family.add(sample, labels, value, name.pid)
    return [f.metric() for f in families.values()]
