"""The master's check of its port groups between reloads (core/slots.py `steer_and_check`).

A Master on fakes (fake clock, processes and notify socket, real listening
sockets on 127.0.0.1) whose `strangers` seam answers what the test scripts:
how often it is asked, what the snapshot carries to /readyz and the metric,
and what is logged. tests/e2e/test_reuseport_foreign.py runs it for real.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from tests.support.fakes import FakeClock, FakeNotify, FakeProcessAPI, fake_system
from tests.support.upgraderd_proc import free_port
from upgraderd.config.schema import Config
from upgraderd.core.master import assemble
from upgraderd.core.slots import STRANGER_CHECK
from upgraderd.metrics.telemetry import health

T0 = 100.0
LINE = "pid 4242 (python3 -c ...) listens on 127.0.0.1:1, which is not this master's socket"


def test_a_stranger_is_found_between_reloads_reported_and_cleared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    caplog.set_level(logging.INFO, logger="upgraderd")
    path, clock, procs, notify = tmp_path / "upgraderd.yaml", FakeClock(T0), FakeProcessAPI(), FakeNotify()
    path.write_text(yaml.safe_dump({"listeners": [{"name": "web", "host": "127.0.0.1", "port": free_port()}],
                                    "workers": {"count": 2, "app": "echo"}}))
    system = fake_system(procs, notify)
    answers: list[list[str]] = []
    asked: list[float] = []

    def strangers(cfg: Config) -> list[str]:
        asked.append(clock())
        return answers.pop(0) if answers else []
    system.strangers = strangers
    m = assemble(str(path), system, clock=clock)
    try:
        m.start()
        notify.ready(*procs.pids(1))
        m.step(set())
        assert m.active is not None and asked == [T0]           # the first pass with an ACTIVE generation
        m.step(set())
        assert asked == [T0]                                     # not again before STRANGER_CHECK
        answers.append([LINE])
        clock.set(T0 + STRANGER_CHECK)
        m.step(set())
        assert asked == [T0, T0 + STRANGER_CHECK]
        snap = m.snapshot(clock())
        assert snap.foreign_listeners == (LINE,)
        assert health(snap, clock()) == (True, False, "a port group is shared: " + LINE)
        assert caplog.messages.count(f"port group shared: {LINE} (/readyz answers 503 until it leaves)") == 1
        answers.append([LINE])                                   # still there: not logged again
        clock.set(T0 + 2 * STRANGER_CHECK)
        m.step(set())
        assert caplog.messages.count(f"port group shared: {LINE} (/readyz answers 503 until it leaves)") == 1
        clock.set(T0 + 3 * STRANGER_CHECK)                       # gone
        m.step(set())
        snap = m.snapshot(clock())
        assert snap.foreign_listeners == () and health(snap, clock())[1:] == (True, "generation 1 active")
        assert "port group: no stranger listens on this master's addresses any more" in caplog.messages
        assert len(asked) == 4
    finally:
        m.system.listeners.close_all()
