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
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import IO, Any

from upgraderd.config.schema import LogSpec

TEXT_FORMAT = "%(asctime)s upgraderd[%(process)d] %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, pid, message (and the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of JSON."""
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "pid": record.process, "message": record.getMessage(),
        }
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
        fmt = JsonFormatter() if spec.format == "json" else logging.Formatter(TEXT_FORMAT)
        self.handler.setFormatter(fmt)
        root.setLevel(getattr(logging, (self.level_override or spec.level).upper()))

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
