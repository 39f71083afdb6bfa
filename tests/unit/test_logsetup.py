"""Log records are one line each: ISO 8601 with offset, journald priorities, structured JSON fields."""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import re
import sys

import pytest

from upgraderd.service import logsetup

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


def _record(msg: str, level: int = logging.ERROR, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("test-logsetup")
    return logger.makeRecord("upgraderd", level, __file__, 1, msg, (), None, extra=extra or None)


def test_one_line_joins_lines():
    assert logsetup.one_line("reload failed, still serving generation 1:\n"
                             "a.yaml:3:11: bad\n  a.yaml:4:1: worse\n") == \
        "reload failed, still serving generation 1: a.yaml:3:11: bad | a.yaml:4:1: worse"
    assert logsetup.one_line("single") == "single"


def test_text_lines_have_an_iso_timestamp_with_offset_and_stay_on_one_line():
    line = logsetup.TextFormatter().format(_record("first\nsecond"))
    assert re.fullmatch(ISO + rf" upgraderd\[{os.getpid()}\] ERROR first \| second", line), line


def test_a_traceback_stays_on_the_record_line():
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "crashed", (),
                                                 sys.exc_info())
    line = logsetup.TextFormatter().format(rec)
    assert "\n" not in line and line.endswith("ValueError: boom") and "Traceback" in line


@pytest.mark.parametrize("level,prio", [(logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6),
                                        (logging.DEBUG, 7), (logging.CRITICAL, 2)])
def test_journal_lines_carry_the_syslog_priority(level, prio):
    line = logsetup.TextFormatter(journal=True).format(_record("hello", level))
    assert line == f"<{prio}>upgraderd[{os.getpid()}] {logging.getLevelName(level)} hello"


def test_journal_stream_must_match_stderr():
    st = os.fstat(2)
    assert logsetup.journal_is_stderr({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not logsetup.journal_is_stderr({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not logsetup.journal_is_stderr({"JOURNAL_STREAM": "garbage"})
    assert not logsetup.journal_is_stderr({})


def test_json_records_carry_the_structured_fields():
    fmt = logsetup.JsonFormatter()
    doc = json.loads(fmt.format(_record("worker exited", logging.WARNING,
                                        **logsetup.fields("worker.exit", generation=3, slot=1,
                                                          worker_pid=4242))))
    assert re.fullmatch(ISO[:-len("[+-]\\d\\d:\\d\\d")] + "Z", doc.pop("time"))
    assert doc == {"level": "warning", "pid": os.getpid(), "message": "worker exited",
                   "event": "worker.exit", "generation": 3, "slot": 1, "worker_pid": 4242}
    plain = json.loads(fmt.format(_record("no fields", logging.INFO)))
    assert set(plain) == {"time", "level", "pid", "message"}


def test_logsetup_applies_the_journal_format_to_stderr_only(monkeypatch):
    from upgraderd.config.schema import LogSpec
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    logs = logsetup.LogSetup()
    try:
        logs.apply(LogSpec())
        assert isinstance(logs.handler.formatter, logsetup.TextFormatter) and logs.handler.formatter.journal
        stream = io.StringIO()
        logs.handler.setStream(stream)
        logging.getLogger("upgraderd").error("a\nb")
        assert stream.getvalue() == f"<3>upgraderd[{os.getpid()}] ERROR a | b\n"
    finally:
        logs.close()


def test_local_time_carries_its_offset():
    rec = _record("x")
    rec.created, rec.msecs = 1_700_000_000.0, 42.0
    stamp = logsetup.iso_time(rec)
    assert re.fullmatch(ISO, stamp) and stamp[19:23] == ".042"
    assert datetime.datetime.fromisoformat(stamp).timestamp() == 1_700_000_000.042
    assert logsetup.iso_time(rec, utc=True) == "2023-11-14T22:13:20.042Z"
