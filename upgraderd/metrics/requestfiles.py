"""One worker's request counts read from its metric files, for the rollouts' traffic checks.

The traffic checks (core/trafficchecks.py) judge a generation by what its
workers answered: `upgraderd_http_requests_total{status_class}` and the
`upgraderd_http_request_duration_seconds` buckets that the built-in `http`
app and the `asgi:`/`wsgi:` server write (apps/asgi/reqmetrics.py). This
module reads them per worker, summed over the worker's listeners, into
`RequestCounts`.

The files are untrusted input: they are read with dbfile.py's bounded,
validating reader, and a file that is missing (the worker was reaped and its
counts folded into the archive, which no longer says which worker gave them)
or fails validation leaves that worker out of the answer. Setting a bad file
aside is the scrape's job (multiproc.py); here it is only skipped.

Cost: two reads of a few KiB per worker; the checks read every half second.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from upgraderd.contract import metricformat as layout
from upgraderd.core.requestcounts import RequestCounts
from upgraderd.metrics import dbfile
from upgraderd.metrics.dbfile import BadFile, Key
from upgraderd.metrics.multiproc import WorkerFiles

REQUESTS = "upgraderd_http_requests_total"
BUCKETS = "upgraderd_http_request_duration_seconds_bucket"
BUDGET = 0.01   # CPU seconds per file (dbfile.py's budget; a worker's file parses in well under 1 ms)


def read(files: WorkerFiles, pids: Sequence[int]) -> Mapping[int, RequestCounts]:
    """Return the request counts of each of `pids` whose files are there and valid."""
    out: dict[int, RequestCounts] = {}
    if not files.enabled:
        return out
    for pid in dict.fromkeys(pids):
        counters = _entries(files, "counter", pid)
        if counters is None:
            continue
        requests = errors = 0.0
        for (_, sample, labels, _), value in counters:
            if sample == REQUESTS:
                requests += value
                if ("status_class", "5xx") in labels:
                    errors += value
        buckets: dict[float, float] = {}
        for (_, sample, labels, _), value in _entries(files, "histogram", pid) or []:
            le = dict(labels).get("le")
            if sample == BUCKETS and le is not None:
                bound = float(le)   # dbfile checked it is a number
                buckets[bound] = buckets.get(bound, 0.0) + value
        out[pid] = RequestCounts(requests, errors, tuple(sorted(buckets.items())))
    return out


def _entries(files: WorkerFiles, prefix: str, pid: int) -> list[tuple[Key, float]] | None:
    path = os.path.join(files.path, layout.file_name(prefix, pid))
    try:
        return dbfile.read_file(path, prefix, files.cache, BUDGET)
    except (FileNotFoundError, BadFile):
        return None
