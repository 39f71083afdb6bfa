"""The real master logs one line per event: ISO 8601 with offset, or journald priorities."""

from __future__ import annotations

import os
import re
import signal

import pytest

from tests.support.upgraderd_proc import Daemon, echo_config, free_port

pytestmark = pytest.mark.e2e

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


def test_text_log_one_line_per_event_with_iso_time_and_the_full_plan_diff(tmp_path):
    port = free_port()
    cfg = echo_config(port, count=2)
    with Daemon(tmp_path, cfg).start() as d:
        d.write_config({**cfg, "drain": {"timeout": "5s"}})
        d.send(signal.SIGHUP)
        d.wait_log(r"reload done: generation 2 ACTIVE")
        d.write_config("listeners: [")
        d.send(signal.SIGHUP)
        d.wait_log(r"reload failed")
        lines = d.log().splitlines()
        pid = d.pid
        bad = [ln for ln in lines if not re.match(ISO + rf" upgraderd\[{pid}\] [A-Z]+ ", ln)]
        assert bad == []
        assert any(ln.endswith(f"reload: plan: listeners keep echo 127.0.0.1:{port} (reuseport); "
                               "workers 2; changed drain.timeout: 10s -> 5s; generation new")
                   for ln in lines), lines
        failed = [ln for ln in lines if " ERROR reload failed" in ln]
        assert len(failed) == 1 and failed[0].endswith(
            "upgraderd.yaml:1:13: YAML syntax error: expected the node content, but found "
            "'<stream end>' (while parsing a flow node at 1:13)"), failed


def test_journal_stream_gives_priorities(tmp_path):
    port = free_port()
    d = Daemon(tmp_path, echo_config(port, count=1))
    d.log_path.touch()
    st = os.stat(d.log_path)
    d.extra_env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    with d.start():
        d.write_config("listeners: [")
        d.send(signal.SIGHUP)
        d.wait_log(r"reload failed")
        lines = d.log().splitlines()
        assert [ln for ln in lines if not re.match(rf"<[2-7]>upgraderd\[{d.pid}\] [A-Z]+ ", ln)] == []
        assert any(ln.startswith(f"<6>upgraderd[{d.pid}] INFO serving: generation 1 ACTIVE")
                   for ln in lines)
        assert [ln[:3] for ln in lines if "reload failed" in ln] == ["<3>"]
