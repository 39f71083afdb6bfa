"""Rollouts in batches (core/batches.py) with the fake clock and fake processes.

Each test serves generation 1, sends HUP with `rollout.strategy: batches`, and
scripts readiness, the old workers' exits after their drain signal, crashes
and the clock. After every pass it counts the live processes of both
generations (draining ones included until they exit): the peak must stay at
workers.count + batches.size, and the verdict must follow exactly.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import Any

import pytest

from tests.unit.test_master import HUP, T0, TERM, Rig, messages
from tests.unit.conftest import RigMaker
from upgraderd.core.generation import GenerationState as G

USR2 = signal.SIGUSR2


def batches(size: int = 1, pause: str = "1s", **checks: Any) -> dict[str, Any]:
    return {"rollout": {"strategy": "batches", "batches": {"size": size, "pause": pause}, "checks": checks}}


class Roll:
    """Drive a rollout in batches; record the peak of live workers after every pass."""

    def __init__(self, rig: Rig, count: int, to: int | None = None, **sections: Any) -> None:
        self.rig, self.count, self.peak, self.now = rig, count, 0, T0
        rig.serving(count, **sections)
        if to is not None:
            rig.write(to, **sections)
        rollouts = rig.master.reloads.rollouts
        assert rollouts is not None
        self.told: list[str] = []   # what systemd is told (STATUS=)
        rollouts.seams = dataclasses.replace(rollouts.seams, tell_systemd=self.told.append)
        self.step(HUP)

    def step(self, *signals: signal.Signals, dt: float = 0.1) -> None:
        self.now += dt
        self.rig.step(*signals, at=self.now)
        self.peak = max(self.peak, len(self.rig.procs.live(1)) + len(self.rig.procs.live(2)))

    def new_workers(self) -> list[int]:
        return self.rig.procs.live(2)

    def slot(self, pid: int) -> int:
        return int(self.rig.procs.spawn_of(pid).env["UPGRADERD_SLOT"])

    def drained(self) -> list[int]:
        """Return the live old workers that were sent the drain signal."""
        return [p for p in self.rig.procs.live(1) if (p, TERM) in self.rig.procs.kills]

    def batch(self, pause: float = 1.0) -> list[int]:
        """Make the batch under way ready, pass its pause, and let the old workers it drained exit;
        return the slots drained."""
        starting = [p for p in self.new_workers()
                    if self.rig.master.generations[-1].pids()[p].state.value == "starting"]
        self.rig.notify.ready(*starting)
        self.step()
        self.step(dt=pause)
        gone = self.drained()
        for pid in gone:
            self.rig.procs.exit(pid, signal=TERM)
        self.step()
        return sorted(self.slot(p) for p in gone)


@pytest.fixture
def rig(rigs: RigMaker[Rig]) -> Rig:
    return rigs(Rig)


def test_batches_of_one_replace_eight_workers_with_at_most_nine_alive(rig: Rig,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    roll = Roll(rig, 8, **batches())
    assert [roll.slot(p) for p in roll.new_workers()] == [0]
    m = rig.master
    for n in range(7):
        assert roll.batch() == [n]                           # the old worker of the slot the batch took over
        assert [roll.slot(p) for p in roll.new_workers()] == list(range(n + 2))
        assert m.active is m.generations[0] and m.stats.reloads["success"] == 0
    assert "rollout: generation 2 batch 8 of 8: slot(s) 7 starting, 8 of 8 workers" in messages(caplog)
    rig.notify.ready(roll.new_workers()[-1])
    roll.step()
    roll.step(dt=1.0)
    assert rig.states() == [(1, G.DRAINING), (2, G.ACTIVE)] and m.active is m.generations[1]
    assert [roll.slot(p) for p in roll.drained()] == [7]     # the last old worker drains after the verdict
    assert m.stats.reloads["success"] == 1 and m.stats.rollouts == {"promoted": 1, "rolled_back": 0}
    assert roll.peak == 9
    assert [t for t in roll.told if "batch" in t] == [
        f"STATUS=generation 2 batch {n} of 8: {n} of 8 workers" for n in range(1, 9)]


def test_a_batch_waits_for_its_pause_and_for_the_old_workers_to_exit(rig: Rig) -> None:
    roll = Roll(rig, 4, **batches(size=2, pause="3s"))
    rig.notify.ready(*roll.new_workers())
    roll.step()
    roll.step(dt=2.8)
    assert roll.drained() == []                              # the pause (3 s from READY) is not over
    roll.step(dt=0.2)
    assert sorted(roll.slot(p) for p in roll.drained()) == [0, 1]
    roll.step(dt=5)
    assert len(roll.new_workers()) == 2                      # no batch before the drained ones exit
    rig.procs.exit(roll.drained()[0], signal=TERM)
    roll.step()
    assert len(roll.new_workers()) == 2
    rig.procs.exit(roll.drained()[0], signal=TERM)
    roll.step()
    assert [roll.slot(p) for p in roll.new_workers()] == [0, 1, 2, 3]
    assert roll.peak == 6


def test_a_crash_at_batch_three_rolls_back_and_the_old_generation_grows_back(rig: Rig) -> None:
    roll = Roll(rig, 8, **batches())
    assert roll.batch() == [0] and roll.batch() == [1]
    third = roll.new_workers()[-1]
    rig.procs.exit(third, code=3)
    roll.step()
    m = rig.master
    assert rig.states()[0] == (1, G.ACTIVE) and m.generations[1].state is G.DRAINING
    assert sorted(roll.slot(p) for p in rig.procs.live(1)[-2:]) == [0, 1]   # respawned in place
    assert sorted(w.slot for w in m.generations[0].workers.values()) == list(range(8))
    assert m.stats.reloads == {"success": 0, "failed": 1, "rejected": 0}
    assert m.stats.rollouts == {"promoted": 0, "rolled_back": 1}
    assert m.stats.rollout_check_failures["crashes"] == 1
    assert m.stats.last_reload_error == ("generation 2 rolled back: check crashes failed: 1 worker exit(s) of "
                                         f"generation 2 (allowed: 0); last: slot 2 pid {third} exit code 3")
    assert sorted(rig.procs.kills_of(rig.procs.live(2))) == [(p, TERM) for p in rig.procs.live(2)]


def test_a_failure_while_old_workers_drain_rolls_back_once_they_exit(rig: Rig) -> None:
    roll = Roll(rig, 4, **batches())
    rig.notify.ready(*roll.new_workers())
    roll.step()
    roll.step(dt=1.0)
    [old] = roll.drained()
    rig.procs.exit(roll.new_workers()[0], code=1)
    roll.step()
    m = rig.master
    assert m.fleet.held is m.generations[1] and m.stats.rollouts["rolled_back"] == 0
    rig.procs.exit(old, signal=TERM)
    roll.step()
    assert m.stats.rollouts["rolled_back"] == 1 and m.fleet.held is None
    assert roll.slot(rig.procs.live(1)[-1]) == 0 and len(rig.procs.live(1)) == 4


def test_a_batch_not_ready_in_time_fails_check_ready(rig: Rig) -> None:
    roll = Roll(rig, 4, **batches(), ready={"timeout": "5s"})
    roll.batch()
    roll.step(dt=4.9)
    assert rig.master.stats.rollouts["rolled_back"] == 0
    roll.step(dt=0.2)
    m = rig.master
    assert m.stats.rollout_check_failures["ready"] == 1
    assert m.stats.last_reload_error.endswith("check ready failed: slot(s) 1 of batch 2 of 4 not ready within 5s")
    assert len(rig.procs.live(1)) == 4


def test_hup_is_queued_usr2_refused_and_status_shows_the_batch(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    from upgraderd.service import status
    roll = Roll(rig, 4, **batches(size=2))
    roll.batch()
    roll.step(HUP, USR2)
    assert rig.procs.pids(3) == []
    assert "received SIGHUP: reload queued, the rollout of generation 2 has no verdict yet" in messages(caplog)
    assert "received SIGUSR2: refused, the rollout of generation 2 has no verdict yet; send USR2 again " \
           "once it is promoted or rolled back" in messages(caplog)
    rig.notify.ready(*roll.new_workers()[2:])
    roll.step()
    doc = status.document(rig.master.snapshot(roll.now))
    assert status.describe_rollout(doc["rollout"], now=doc["rollout"]["window_ends"]) == \
        "rollout: generation 2 batch 2 of 2, 4 of 4 workers ready; generation 1 serves the rest (checks: crashes)"
    assert rig.master.snapshot(roll.now).active_generation == 1


def test_promote_ends_the_pauses(rig: Rig) -> None:
    roll = Roll(rig, 4, **batches(size=2, pause="60s"))
    rig.notify.ready(*roll.new_workers())
    roll.step()
    left = ["promote 2"]
    rig.master.reloads.seams = dataclasses.replace(rig.master.reloads.seams,
                                                   requests=lambda: left.pop() if left else "")
    roll.step(signal.SIGWINCH)
    assert len(roll.drained()) == 2
    for pid in roll.drained():
        rig.procs.exit(pid, signal=TERM)
    roll.step()
    rig.notify.ready(*roll.new_workers()[2:])
    roll.step()
    assert rig.master.stats.rollouts["promoted"] == 1


@pytest.mark.parametrize("before, after, size, peak", [(4, 6, 2, 7), (8, 4, 1, 9), (8, 8, 3, 11)])
def test_the_peak_is_the_larger_count_plus_size_when_a_reload_changes_the_count(
        rig: Rig, before: int, after: int, size: int, peak: int) -> None:
    roll = Roll(rig, before, to=after, **batches(size=size))
    while rig.master.stats.rollouts["promoted"] == 0:
        assert len(roll.new_workers()) <= after
        roll.batch()
    assert [roll.slot(p) for p in roll.new_workers()] == list(range(after))
    assert rig.states() == [(2, G.ACTIVE)] and rig.procs.live(1) == []   # the last old ones drained, exited
    assert roll.peak == peak <= max(before, after) + size
