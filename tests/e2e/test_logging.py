"""log.file, log.format and log.level, SIGUSR1 reopening, and log settings changed by a reload."""

from __future__ import annotations

import json
import signal

import pytest

from tests.support.upgraderd_proc import Daemon, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e


def test_log_file_reopen_and_reload_to_json(tmp_path):
    port = free_port()
    log = tmp_path / "master.log"
    cfg = echo_config(port, count=1, log={"file": str(log)})
    with Daemon(tmp_path, cfg).start(wait=False) as d:
        wait_until(lambda: log.exists() and "serving: generation 1 ACTIVE" in log.read_text(), 20,
                   "generation 1 in the log file")
        assert d.log() == ""  # records go to the file, not to stderr
        first = log.read_text().splitlines()
        assert all(f" upgraderd[{d.pid}] " in line for line in first if not line.startswith("  "))

        log.rename(tmp_path / "master.log.1")
        d.send(signal.SIGUSR1)
        wait_until(lambda: log.exists() and "reopened the log file (SIGUSR1)" in log.read_text(), 15,
                   "a new log file after SIGUSR1")

        d.write_config(echo_config(port, count=1, log={"file": str(log), "format": "json",
                                                       "level": "warning"}))
        d.send(signal.SIGHUP)
        wait_until(lambda: "reload done: generation 2 ACTIVE" in log.read_text(), 20, "the reload")
        d.write_config("listeners: [")
        d.send(signal.SIGHUP)
        wait_until(lambda: "reload failed" in log.read_text(), 20, "the rejected reload")
        lines = log.read_text().splitlines()
        after = lines[next(i for i, ln in enumerate(lines) if "reload done: generation 2" in ln) + 1:]
        records = [json.loads(line) for line in after]
        # Level warning: the info lines of the drain are gone; the error is one JSON line.
        assert [r["level"] for r in records] == ["error"]
        assert records[0]["message"].startswith("reload failed, still serving generation 2: ")
        assert records[0]["message"].endswith("upgraderd.yaml:1:13: YAML syntax error: expected the "
                                              "node content, but found '<stream end>' (while parsing "
                                              "a flow node at 1:13)")
        assert records[0]["pid"] == d.pid
