"""`rollback: manual` (core/rollouthold.py): a failing check holds the canary for the operator,
with the fake clock and fake processes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_master import T0, TERM, Rig, messages
from tests.unit.test_rollout import ask, canary, start_canary
from tests.unit.conftest import RigMaker
from upgraderd.core.generation import GenerationState as G
from upgraderd.service import status


def manual(**checks: Any) -> dict[str, Any]:
    spec = canary(**checks)
    spec["rollout"]["rollback"] = "manual"
    return spec


@pytest.fixture
def rig(rigs: RigMaker[Rig]) -> Rig:
    return rigs(Rig)


def held_canary(rig: Rig) -> int:
    """Start a manual canary and crash it at T0+5: the rollout holds; return the crashed pid."""
    pid = start_canary(rig, **manual())
    rig.procs.exit(pid, code=3)
    rig.step(at=T0 + 5)
    return pid


def test_a_failing_check_holds_the_canary_beside_the_serving_generation(rig: Rig,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    pid = held_canary(rig)
    m = rig.master
    assert rig.states() == [(1, G.ACTIVE), (2, G.ACTIVE)]
    assert m.fleet.held is m.generations[1] and m.active is m.generations[0]
    assert rig.procs.kills_of(rig.procs.pids(1)) == [] and rig.procs.kills_of(rig.procs.pids(2)) == []
    assert m.stats.rollout_check_failures["crashes"] == 1
    assert m.stats.rollouts == {"promoted": 0, "rolled_back": 0} and sum(m.stats.reloads.values()) == 0
    why = f"check crashes failed: 1 worker exit(s) of generation 2 (allowed: 0); last: slot 0 pid {pid} exit code 3"
    assert (f"rollout: generation 2 {why}; holding it for the operator (rollback: manual): the canary keeps its "
            "share beside generation 1 until `upgraderd promote` or `upgraderd rollback`") in messages(caplog)
    # The window's end no longer decides, and the loop has no rollout deadline to spin on.
    assert m.reloads.rollouts.deadlines() == []
    rig.step(at=T0 + 0.3 + 5)
    rig.ready(rig.procs.pids(2)[1], at=T0 + 60)
    assert rig.states() == [(1, G.ACTIVE), (2, G.ACTIVE)] and len(rig.procs.pids(2)) == 2   # respawned, not grown
    doc = status.document(m.snapshot(T0 + 60))
    assert doc["rollout"]["held"] == why
    assert status.describe_rollout(doc["rollout"], 0) == (
        f"rollout: generation 2 canary held, 1 of 4 workers beside generation 1: {why}; waiting for "
        "`upgraderd promote` or `upgraderd rollback`")
    assert m.stats.rollout_check_failures["crashes"] == 1   # counted once, at the hold


def test_promote_after_a_hold_grows_the_canary_and_drains_the_old_generation(rig: Rig) -> None:
    held_canary(rig)
    rig.step(at=T0 + 5.5)                                    # the crashed slot is respawned
    ask(rig, "promote 2", at=T0 + 6)
    respawned, *grown = rig.procs.pids(2)[1:]
    assert len(grown) == 3
    rig.ready(respawned, *grown, at=T0 + 7)
    m = rig.master
    assert rig.states() == [(1, G.DRAINING), (2, G.ACTIVE)]
    assert sorted(rig.procs.kills_of(rig.procs.pids(1))) == [(p, TERM) for p in rig.procs.pids(1)]
    assert m.stats.rollouts == {"promoted": 1, "rolled_back": 0} and m.stats.reloads["success"] == 1


def test_rollback_after_a_hold_drains_the_canary_and_names_the_check(rig: Rig) -> None:
    pid = held_canary(rig)
    ask(rig, "rollback 2", at=T0 + 6)
    m = rig.master
    assert m.generations[1].state is G.DRAINING and m.active is m.generations[0]
    assert rig.procs.kills_of(rig.procs.pids(1)) == []
    assert m.stats.rollouts == {"promoted": 0, "rolled_back": 1} and m.stats.reloads["failed"] == 1
    assert m.stats.last_reload_error == (
        "generation 2 rolled back: aborted by `upgraderd rollback` (check crashes failed: 1 worker exit(s) of "
        f"generation 2 (allowed: 0); last: slot 0 pid {pid} exit code 3)")
    assert m.stats.rollout_check_failures["crashes"] == 1
