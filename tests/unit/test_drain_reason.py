"""A draining worker tells a reload from a stop: the master's stop marker and how a worker reads it.

The master emits StopBegun before it signals any worker (core/fleet.py), the
service then creates the marker in the hand-off channel directory without
following anything a worker put there (system/channeldir.py), and the worker
library reads it as `Drain.reason` (upgraderd/worker/__init__.py).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.support.fakes import FakeClock, FakeNotify, FakeProcessAPI, fake_system
from tests.unit.test_master import Rig
from tests.unit.conftest import RigMaker
from upgraderd import worker
from upgraderd.contract import env, wire
from upgraderd.core import events as ev
from upgraderd.core.master import assemble
from upgraderd.system import channeldir

TERM, INT, HUP = signal.SIGTERM, signal.SIGINT, signal.SIGHUP


class BusRig(Rig):
    """The master rig, with the bus in our hands: what the service would subscribe."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.bus = ev.Bus()
        self.clock = FakeClock(100.0)
        self.procs, self.notify = FakeProcessAPI(), FakeNotify()
        self.master = assemble(str(self.path), fake_system(self.procs, self.notify), bus=self.bus,
                               clock=self.clock)
        self.stops: list[tuple[str, int]] = []   # (mode, drain signals sent before it)
        self.bus.subscribe(ev.StopBegun, lambda e: self.stops.append((e.mode, len(self.procs.kills))))


@pytest.fixture
def bus_rig(rigs: RigMaker[BusRig]) -> BusRig:
    return rigs(BusRig)


@pytest.mark.parametrize("sig, mode", [(TERM, "graceful"), (INT, "fast")])
def test_the_stop_is_announced_before_any_worker_is_signalled(bus_rig: BusRig, sig: signal.Signals,
                                                              mode: str) -> None:
    bus_rig.serving(count=2)
    bus_rig.step(HUP, at=101)
    bus_rig.ready(*bus_rig.procs.pids(2), at=102)
    drained_by_reload = len(bus_rig.procs.kills)
    assert drained_by_reload == 2 and bus_rig.stops == []   # a reload's drain is no stop
    bus_rig.step(sig, at=103)
    assert bus_rig.stops == [(mode, drained_by_reload)]
    assert len(bus_rig.procs.kills) > drained_by_reload


@pytest.fixture
def channels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "upgraderd-1-handoff-abcdefgh"
    d.mkdir(mode=0o700)
    monkeypatch.setenv(env.HANDOFF_DIR, str(d))
    return d


def test_the_marker_is_made_once_and_read_by_the_worker(channels: Path) -> None:
    assert not worker.stopping()
    assert channeldir.mark_stopping(str(channels))
    assert worker.stopping() and (channels / wire.STOP_MARKER).is_file()
    assert channeldir.mark_stopping(str(channels))   # again (TERM then INT): still marked


def test_a_symlink_a_worker_planted_at_the_marker_is_not_followed(channels: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    victim.chmod(0o600)
    (channels / wire.STOP_MARKER).symlink_to(victim)
    assert channeldir.mark_stopping(str(channels))
    assert victim.read_text() == "precious" and victim.stat().st_mode & 0o777 == 0o600


def test_only_the_masters_own_directory_is_marked(channels: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert not channeldir.mark_stopping(str(other))
    assert not channeldir.mark_stopping("")
    assert not (other / wire.STOP_MARKER).exists()


def test_drain_reason_is_none_then_reload_then_stop_once_the_master_stops(channels: Path) -> None:
    old = signal.getsignal(signal.SIGTERM)
    try:
        drain = worker.on_drain()
        assert drain.reason is None
        signal.raise_signal(signal.SIGTERM)
        assert drain.requested and drain.reason == "reload"
        channeldir.mark_stopping(str(channels))
        assert drain.reason == "stop"   # a reload's drain that the master's stop overtook
    finally:
        signal.signal(signal.SIGTERM, old)


def test_outside_upgraderd_a_drain_is_never_a_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(env.HANDOFF_DIR, raising=False)
    assert not worker.stopping()
    monkeypatch.setenv(env.HANDOFF_DIR, "relative/dir")
    assert not worker.stopping()
