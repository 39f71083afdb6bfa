"""A built-in worker's own log lines (apps/logline.py) read as the master's (service/logsetup.py)."""

from __future__ import annotations

import json
import logging
import os

from upgraderd.apps import logline
from upgraderd.service.logsetup import JsonFormatter, TextFormatter

MESSAGE = "worker generation 1 slot 3: handed 1 of 1 connection(s) to 4 worker(s) in 106 ms"


def record(now: float) -> logging.LogRecord:
    r = logging.LogRecord("upgraderd", logging.INFO, __file__, 1, MESSAGE, None, None)
    r.created, r.msecs, r.process = now, (now - int(now)) * 1000, os.getpid()
    return r


def test_the_text_line_is_the_masters() -> None:
    now = 1_765_000_000.25
    assert logline.line(MESSAGE, now=now, env={}, journal=False) == TextFormatter().format(record(now))
    assert logline.line(MESSAGE, now=now, env={}, journal=True) == \
        TextFormatter(journal=True).format(record(now))


def test_the_json_line_is_the_masters() -> None:
    now = 1_765_000_000.25
    got = json.loads(logline.line(MESSAGE, now=now, env={"UPGRADERD_LOG_FORMAT": "json"}))
    assert got == json.loads(JsonFormatter().format(record(now)))
