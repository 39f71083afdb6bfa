"""Fixtures shared by the unit tests that drive a Master with the fake clock and fake processes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pytest

R = TypeVar("R")
RigMaker = Callable[[Callable[[Path], R]], R]


@pytest.fixture
def rigs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[RigMaker[Any]]:
    """Build a test's rig class on `tmp_path` (`rigs(Rig)`), with notify_systemd() a no-op and the
    master's debug log captured; every rig's listening sockets and probes are closed after the test
    (a probe left connected keeps a test's one-thread HTTP server from shutting down)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    caplog.set_level(logging.DEBUG, logger="upgraderd")
    made: list[Any] = []

    def make(cls: Callable[[Path], R]) -> R:
        r = cls(tmp_path)
        made.append(r)
        return r

    try:
        yield make
    finally:
        for r in made:
            system = r.master.system
            system.listeners.close_all()
            for probes in (system.probes, system.check_probes):
                if probes is not None:
                    probes.close()


def passes(master: Any, signals: set[Any] | None = None) -> None:
    """Run one pass of `master`, then the passes it asks for at once (a loop timeout of 0), as run() does.

    More than two such passes in a row would be a busy loop: that fails the test.
    """
    master.step(set() if signals is None else signals)
    for _ in range(2):
        if master.timeout() > 0:
            return
        master.step(set())
    assert master.timeout() > 0, "the master asks for a pass at once, again and again"
