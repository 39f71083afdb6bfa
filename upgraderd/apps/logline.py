"""A built-in worker's own log line, in the master's format, on the stderr they share.

A worker writes to the stderr it inherited from the master: the terminal, the
journal, or with --daemon the log file. Its lines take the master's format
(service/logsetup.py, which the apps layer may not import), so a log reads as
one: `TIME upgraderd[PID] LEVEL message` for text, `<N>upgraderd[PID] LEVEL
message` when stderr is the journal (it adds the time), and one JSON object
when the master's `log.format` is json (UPGRADERD_LOG_FORMAT).
tests/unit/test_logline.py checks the lines against the master's formatters.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

from upgraderd.contract import env as contract

PRIORITY = {"ERROR": 3, "WARNING": 4, "INFO": 6}


def line(message: str, level: str = "INFO", now: float | None = None,
         env: dict[str, str] | None = None, journal: bool | None = None) -> str:
    """Return `message` as one line of the master's log format."""
    env = dict(os.environ) if env is None else env
    now = time.time() if now is None else now
    dt = datetime.datetime.fromtimestamp(int(now)).astimezone()
    msecs = int((now - int(now)) * 1000)
    if env.get(contract.LOG_FORMAT) == "json":
        utc = datetime.datetime.fromtimestamp(int(now), datetime.timezone.utc)
        return json.dumps({"time": f"{utc:%Y-%m-%dT%H:%M:%S}.{msecs:03d}Z", "level": level.lower(),
                           "pid": os.getpid(), "message": message}, ensure_ascii=False)
    if _journal(env) if journal is None else journal:
        return f"<{PRIORITY.get(level, 6)}>upgraderd[{os.getpid()}] {level} {message}"
    stamp = f"{dt:%Y-%m-%dT%H:%M:%S}.{msecs:03d}{dt.isoformat()[19:]}"
    return f"{stamp} upgraderd[{os.getpid()}] {level} {message}"


def log(message: str, level: str = "INFO") -> None:
    """Write `message` to stderr in the master's format, as one write: stderr to a file is
    unbuffered (write-through to the raw file), where `print` writes the line and its newline
    apart, and two workers logging at once then interleave (`line Aline B\n\n`)."""
    sys.stderr.write(line(message, level) + "\n")
    sys.stderr.flush()


def _journal(env: dict[str, str]) -> bool:
    """Return True if stderr is the journal stream JOURNAL_STREAM names (as the master decides)."""
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return dev.isdigit() and ino.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(ino))
