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
    master's debug log captured; every rig's listening sockets are closed after the test."""
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
            r.master.system.listeners.close_all()
