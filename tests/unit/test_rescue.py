"""The master's decision to rescue what queued on a dead reuseport slot's socket (core/rescue.py).

A Master on fakes (fake clock, processes and notify socket, real listening
sockets on 127.0.0.1) with a recording `RescueAPI`: which sockets it is asked
to drain, for which READY slots, and whether each socket was still open then.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.fakes import FakeClock, FakeNotify, FakeProcessAPI, fake_system
from tests.support.upgraderd_proc import free_port
from tests.unit.conftest import RigMaker
from upgraderd.core import rescue
from upgraderd.core.generation import WorkerState as W
from upgraderd.core.master import Master, assemble
from upgraderd.core.seams import Rescue
from upgraderd.system.sockets import ListenerSet

T0 = 100.0


class RecordingRescue:
    """A RescueAPI that records each plan, whether its sockets were open, and answers scripted counts."""

    def __init__(self, listeners: ListenerSet) -> None:
        self.listeners = listeners
        self.plans: list[Rescue] = []
        self.open: list[list[bool]] = []
        self.counts: list[int] = []   # the next answer's per-socket counts (then zeros)
        self.closed = False

    def rescue(self, plan: Rescue) -> list[int]:
        self.plans.append(plan)
        self.open.append([self.listeners.fileno_of(key) is not None for key, _ in plan.sockets])
        out, self.counts = self.counts or [0] * len(plan.sockets), []
        return out

    def close(self) -> None:
        self.closed = True


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "upgraderd.yaml"
        self.port = free_port()
        self.clock = FakeClock(T0)
        self.procs = FakeProcessAPI()
        self.notify = FakeNotify()
        system = fake_system(self.procs, self.notify)
        assert isinstance(system.listeners, ListenerSet)
        self.saver = RecordingRescue(system.listeners)
        system.rescue = self.saver
        self.master = assemble(str(self.path), system, clock=self.clock)

    def serving(self, count: int = 3, mode: str = "reuseport", protocol: str = "tcp", **sections: Any) -> Master:
        listener = {"name": "web", "host": "127.0.0.1", "port": self.port, "mode": mode, "protocol": protocol}
        doc = {"listeners": [listener],
               "workers": {"count": count, "app": "echo"},
               "restart": {"backoff": 0.5, "max_backoff": 1, "crash_loop": 2}, **sections}
        self.path.write_text(yaml.safe_dump(doc))
        self.master.start()
        self.notify.ready(*self.procs.pids(1))
        self.master.step(set())
        assert self.master.active is not None
        return self.master

    def step(self, at: float, *signals: signal.Signals) -> None:
        self.clock.set(at)
        self.master.step(set(signals))

    def key(self, slot: int) -> tuple[str, int, str, int]:
        return ("127.0.0.1", self.port, "reuseport", slot)


@pytest.fixture
def rig(rigs: RigMaker[Rig]) -> Rig:
    return rigs(Rig)


def test_nothing_to_rescue_while_every_slot_serves(rig: Rig) -> None:
    m = rig.serving()
    rig.step(T0 + 1)
    assert rig.saver.plans == []
    assert m.slots.next_deadline(T0 + 1) is None


def test_a_slot_in_backoff_is_drained_to_its_ready_siblings_and_watched(rig: Rig,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    m = rig.serving()
    rig.saver.counts = [3]
    rig.procs.exit(rig.procs.pids(1)[1], code=1)
    rig.step(T0 + 1)
    assert m.generations[0].workers[1].state is W.BACKOFF
    assert rig.saver.plans == [Rescue(1, ((rig.key(1), "web"),), (0, 2))]
    assert rig.saver.open == [[True]]
    assert m.stats.rescued_connections == 3
    assert ("generation 1 slot 1: took 3 connection(s) queued on its socket (web 127.0.0.1:%d), "
            "handing them to slot(s) 0, 2" % rig.port) in caplog.messages
    # Late arrivals (a handshake that began before steering changed) are looked for soon.
    assert m.timeout(T0 + 1) == pytest.approx(rescue.POLL)
    rig.step(T0 + 1 + rescue.POLL)
    assert len(rig.saver.plans) == 2 and m.stats.rescued_connections == 3
    # Respawned: its own worker accepts again (STARTING), so the master leaves the socket alone.
    rig.step(T0 + 1.5)
    assert m.generations[0].workers[1].state is W.STARTING
    plans = len(rig.saver.plans)
    rig.step(T0 + 1.6)
    assert len(rig.saver.plans) == plans
    assert m.slots.next_deadline(T0 + 1.6) is None


def test_a_fatal_slot_is_drained_before_its_socket_closes(rig: Rig) -> None:
    m = rig.serving()
    w = m.generations[0].workers[2]
    rig.procs.exit(w.pid, code=1)                     # type: ignore[arg-type]
    rig.step(T0 + 1)
    rig.step(T0 + 1.5)                                # respawned
    rig.saver.counts = [2]
    rig.procs.exit(w.pid, code=1)                     # type: ignore[arg-type]
    rig.step(T0 + 2)
    assert w.state is W.FATAL
    # Drained in the pass that closed it, while it was still open.
    assert rig.saver.plans[-1] == Rescue(1, ((rig.key(2), "web"),), (0, 1))
    assert rig.saver.open[-1] == [True]
    assert m.system.listeners.keys() == {rig.key(0), rig.key(1)}
    assert m.stats.rescued_connections == 2
    # Closed: nothing left to watch, and no polling for a slot that will never come back.
    assert m.slots.next_deadline(T0 + 2) is None


def test_no_rescue_without_a_ready_sibling(rig: Rig) -> None:
    m = rig.serving(count=1)
    rig.procs.exit(rig.procs.pids(1)[0], code=1)
    rig.step(T0 + 1)
    assert m.generations[0].workers[0].state is W.BACKOFF
    assert rig.saver.plans == []
    assert m.slots.next_deadline(T0 + 1) is None


def test_shared_mode_has_no_slot_socket_to_rescue(rig: Rig) -> None:
    rig.serving(mode="shared")
    rig.procs.exit(rig.procs.pids(1)[1], code=1)
    rig.step(T0 + 1)
    assert rig.saver.plans == []


def test_a_udp_slot_has_no_connection_queue_to_rescue(rig: Rig) -> None:
    # Its datagrams wait on the held socket for the respawned worker; accept() would fail on it.
    rig.serving(protocol="udp")
    rig.procs.exit(rig.procs.pids(1)[1], code=1)
    rig.step(T0 + 1)
    assert rig.saver.plans == []


def test_a_retiring_slot_and_a_stopping_master_are_left_alone(rig: Rig) -> None:
    m = rig.serving()
    rig.step(T0 + 1, signal.SIGTTOU)                  # slot 2 drains on its own
    assert m.generations[0].workers[2].retiring
    rig.procs.exit(rig.procs.pids(1)[2])
    rig.step(T0 + 2)
    assert rig.saver.plans == []
    rig.procs.exit(rig.procs.pids(1)[0], code=1)
    rig.step(T0 + 3)
    assert rig.saver.plans == [Rescue(1, ((rig.key(0), "web"),), (1,))]
    rig.step(T0 + 3.1, signal.SIGTERM)
    assert len(rig.saver.plans) == 1
    assert m.slots.next_deadline(T0 + 3.1) is None   # nothing is rescued while the master stops


def test_closing_the_system_closes_the_rescue(rig: Rig) -> None:
    rig.serving()
    rig.master.system.close()
    assert rig.saver.closed
