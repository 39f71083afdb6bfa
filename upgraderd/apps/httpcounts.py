"""Request counts of the built-in `http` app: the same series as the asgi: server's.

The rollouts' traffic checks (core/trafficchecks.py) judge a release by its
workers' `upgraderd_http_requests_total{status_class}` and
`upgraderd_http_request_duration_seconds`; the asgi:/wsgi: server writes them
(apps/asgi/reqmetrics.py), and so does the built-in `http` app through this
module, with the same `RequestMetrics`.

Design note: a protocol object is made per connection by a factory that gets
only the listener's name (apps/server.py), and a worker with `threads: N`
runs N event loops. So each thread has its own `RequestMetrics` (a
thread-local, made on the first request count asked for in that thread), and
the loop that serves the thread's connections writes it out at its
housekeeping: connmetrics' `flush()` calls `flush_thread()`, in that thread.
A thread that never served HTTP has none, so the echo app writes no HTTP
series. The file writes take `metricfile.WRITE_LOCK`, which every metric
writer of the process shares.
"""

from __future__ import annotations

import os
import threading

from upgraderd.apps.asgi.reqmetrics import RequestMetrics
from upgraderd.contract.env import METRICS_DIR

_LOCAL = threading.local()


def for_thread(listener: str) -> RequestMetrics:
    """Return this thread's request counts, counting `listener` too."""
    counts: RequestMetrics | None = getattr(_LOCAL, "counts", None)
    if counts is None or getattr(_LOCAL, "pid", 0) != os.getpid():   # a fork counts apart
        counts = _LOCAL.counts = RequestMetrics([], bool(os.environ.get(METRICS_DIR)))
        _LOCAL.pid = os.getpid()
    counts.add_listener(listener)
    return counts


def flush_thread(draining: bool) -> None:
    """Write this thread's request counts, if it has any."""
    counts: RequestMetrics | None = getattr(_LOCAL, "counts", None)
    if counts is not None and counts.enabled:
        counts.flush(None, draining)
