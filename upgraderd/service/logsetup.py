"""The master's log: text or JSON lines, to stderr or a file, reopened on SIGUSR1.

Two layouts:
- foreground: records go to stderr, or to `log.file` when it is set; the
  workers' own stdout and stderr stay the master's (a terminal, the journal).
- daemon: fds 1 and 2 *are* the log file (DaemonContext put them there), so
  records, workers' output and any traceback all land in it. Reopening
  re-points fds 1 and 2 at a freshly opened file, which is what logrotate
  needs: after it renames the file and sends SIGUSR1, new lines go to the new
  file. Workers started later inherit the new file; running ones keep the old
  one until they exit.

`apply()` is called again after every successful reload with the new `log`
section, so a changed level, format or file takes effect without a restart.

Every record is one line, whatever its message holds: text lines carry an
ISO 8601 timestamp with its UTC offset, and a message or traceback that spans
several lines is joined by `one_line()`. When stderr is the journal (systemd
sets JOURNAL_STREAM to stderr's device:inode), text lines start with a `<N>`
syslog priority instead of a timestamp, so `journalctl -p err` filters them.
JSON records carry the structured fields of `FIELDS` when a call passes them
with `extra=` (see `fields()`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import IO, Any

from upgraderd.config.schema import LogSpec

TEXT_FORMAT = "%(asctime)s upgraderd[%(process)d] %(levelname)s %(message)s"
JOURNAL_FORMAT = "upgraderd[%(process)d] %(levelname)s %(message)s"
#: Structured fields a log call may pass with `extra=`; JSON records carry them.
#: `pid` stays the logging process (the master); a worker's pid is `worker_pid`.
FIELDS = ("event", "generation", "slot", "worker_pid")
#: syslog priorities (sd-daemon(3)) by logging level.
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
            logging.DEBUG: 7}


def one_line(text: str) -> str:
    """Join a multi-line text into one line: ` | ` between lines, a space after a colon."""
    out = ""
    for part in (ln.strip() for ln in text.splitlines()):
        if not part:
            continue
        out += part if not out else (" " if out.endswith(":") else " | ") + part
    return out


def fields(event: str, generation: int | None = None, slot: int | None = None,
           worker_pid: int | None = None) -> dict[str, Any]:
    """Return the `extra=` mapping of a log call's structured fields."""
    given = {"event": event, "generation": generation, "slot": slot, "worker_pid": worker_pid}
    return {k: v for k, v in given.items() if v is not None}


def iso_time(record: logging.LogRecord, utc: bool = False) -> str:
    """Return a record's time as ISO 8601 with milliseconds and its offset (`Z` in UTC)."""
    tz = datetime.timezone.utc if utc else None
    dt = datetime.datetime.fromtimestamp(int(record.created), tz).astimezone(tz)
    offset = "Z" if utc else dt.isoformat()[19:]
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{int(record.msecs):03d}{offset}"


def journal_is_stderr(environ: dict[str, str] | None = None) -> bool:
    """Return True if fd 2 is the stream JOURNAL_STREAM names (stderr goes to journald)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return dev.isdigit() and ino.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(ino))


class TextFormatter(logging.Formatter):
    """`TIME upgraderd[PID] LEVEL message` on one line; `<N>` priority first for the journal."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__(JOURNAL_FORMAT if journal else TEXT_FORMAT)
        self.journal = journal

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """Return ISO 8601 local time with its offset."""
        return iso_time(record)

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line."""
        line = one_line(super().format(record))
        if self.journal:
            return f"<{PRIORITY.get(record.levelno, 6)}>{line}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, pid, message, FIELDS given, traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of JSON."""
        doc: dict[str, Any] = {
            "time": iso_time(record, utc=True),
            "level": record.levelname.lower(), "pid": record.process, "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class LogSetup:
    """Owns the root logger's one handler and the file behind it."""

    def __init__(self, daemon: bool = False, level: str | None = None) -> None:
        self.daemon = daemon
        self.level_override = level
        self.spec: LogSpec | None = None
        self.handler: logging.StreamHandler[Any] | None = None
        self._file: IO[str] | None = None

    def apply(self, spec: LogSpec) -> None:
        """Configure logging for `spec`; nothing happens if it did not change."""
        if spec == self.spec:
            return
        root = logging.getLogger()
        if self.handler is None:
            self.handler = logging.StreamHandler(sys.stderr)
            root.addHandler(self.handler)
        if self.spec is None or spec.file != self.spec.file:
            self._point_at(spec.file)  # may raise OSError: then nothing changed
        self.spec = spec
        self.handler.setFormatter(self._formatter(spec))
        root.setLevel(getattr(logging, (self.level_override or spec.level).upper()))

    def _formatter(self, spec: LogSpec) -> logging.Formatter:
        if spec.format == "json":
            return JsonFormatter()
        # Only stderr can be the journal; in daemon mode fd 2 is the log file, whose
        # inode never matches JOURNAL_STREAM, so the check holds there as well.
        return TextFormatter(journal=not spec.file and journal_is_stderr())

    def reopen(self) -> None:
        """Reopen the log file (SIGUSR1); a no-op when logging to stderr."""
        if self.spec is not None and self.spec.file:
            self._point_at(self.spec.file)

    def _point_at(self, path: str | None) -> None:
        assert self.handler is not None
        if self.daemon:
            if path:
                redirect_std(path)
            return
        new = open(path, "a", encoding="utf-8", buffering=1) if path else sys.stderr
        self.handler.setStream(new)
        if self._file is not None:
            self._file.close()
        self._file = new if path else None

    def close(self) -> None:
        """Flush and detach the handler."""
        if self.handler is not None:
            self.handler.flush()
            logging.getLogger().removeHandler(self.handler)
            self.handler = None
        if self._file is not None:
            self._file.close()
            self._file = None


def redirect_std(path: str) -> None:
    """Point fds 1 and 2 at `path`, opened for appending."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
