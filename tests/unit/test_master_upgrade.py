"""USR2 with fake processes: the preflight of the new code gates the re-exec, without blocking the loop."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from tests.unit.test_master import T0, Rig, messages, rig  # noqa: F401  (the fixture)
from upgraderd.core.generation import GenerationState as G
from upgraderd.core.selfexec import PREFLIGHT_TIMEOUT

USR2 = signal.SIGUSR2


def record_execs(rig: Rig) -> list[Any]:
    """Return the hand-overs the rig's exec seam records (it then fails like a broken exec)."""
    return rig.execs.records


def preflight_pid(rig: Rig) -> int:
    spawn = rig.procs.spawns[-1]
    assert list(spawn.argv[-4:]) == ["upgraderd", "preflight", "-c", str(rig.path)]
    assert spawn.fds == ()
    return spawn.pid


def test_usr2_execs_only_after_the_preflight_passes(rig: Rig) -> None:
    m = rig.serving(count=2)
    execs = record_execs(rig)
    rig.step(USR2, at=T0 + 1)
    pid = preflight_pid(rig)
    assert execs == []                                   # the loop goes on meanwhile
    rig.step(at=T0 + 2)
    assert execs == []
    rig.procs.exit(pid, code=0)
    rig.step(at=T0 + 3)
    assert len(execs) == 1
    record = execs[0]
    assert record.next_number == 2 and [g["number"] for g in record.generations] == [1]
    # This exec failed: the old master carries on, the upgrade counts as failed.
    assert m.stats.reloads["failed"] == 1
    assert rig.states() == [(1, G.ACTIVE)]
    # The preflight child is not a worker: its exit is not a worker exit.
    assert sum(m.stats.worker_exits.values()) == 0


@pytest.mark.parametrize("code", [1, 70])
def test_a_failing_preflight_refuses_the_upgrade(rig: Rig, caplog: pytest.LogCaptureFixture, code: int) -> None:
    m = rig.serving(count=2)
    execs = record_execs(rig)
    rig.step(USR2, at=T0 + 1)
    rig.procs.exit(preflight_pid(rig), code=code)
    rig.step(at=T0 + 2)
    assert execs == []
    assert m.stats.reloads == {"success": 0, "failed": 1, "rejected": 0}
    assert m.stats.last_reload_error == (f"master upgrade refused: the preflight of the new code failed "
                                         f"(exit code {code}); see its output above")
    assert rig.states() == [(1, G.ACTIVE)]


def test_a_hanging_preflight_is_killed_at_its_deadline_and_refuses(rig: Rig) -> None:
    m = rig.serving(count=2)
    execs = record_execs(rig)
    rig.step(USR2, at=T0 + 1)
    pid = preflight_pid(rig)
    assert m.timeout(T0 + 1) <= 1.0
    rig.step(at=T0 + 1 + PREFLIGHT_TIMEOUT - 0.001)
    assert (pid, signal.SIGKILL) not in rig.procs.kills
    rig.step(at=T0 + 1 + PREFLIGHT_TIMEOUT)
    assert (pid, signal.SIGKILL) in rig.procs.kills
    rig.procs.exit(pid, signal=signal.SIGKILL)
    rig.step(at=T0 + 2 + PREFLIGHT_TIMEOUT)
    assert execs == []
    assert m.stats.reloads["failed"] == 1
    assert "timed out" in m.stats.last_reload_error


def test_a_preflight_that_passes_still_refuses_an_invalid_config_at_exec(rig: Rig) -> None:
    m = rig.serving(count=2)
    execs = record_execs(rig)
    rig.step(USR2, at=T0 + 1)
    pid = preflight_pid(rig)
    rig.path.write_text("listeners: [")          # broken after the preflight read it
    rig.procs.exit(pid, code=0)
    rig.step(at=T0 + 2)
    assert execs == []
    assert m.stats.reloads == {"success": 0, "failed": 0, "rejected": 1}
    assert m.stats.last_reload_error.startswith("master upgrade refused, the config is invalid: ")
    assert rig.states() == [(1, G.ACTIVE)]


def test_an_invalid_config_refuses_the_upgrade_before_any_preflight(rig: Rig) -> None:
    m = rig.serving(count=2)
    execs = record_execs(rig)
    spawned = len(rig.procs.spawns)
    rig.path.write_text("listeners: [")
    rig.step(USR2, at=T0 + 1)
    assert len(rig.procs.spawns) == spawned
    assert execs == []
    assert m.stats.reloads == {"success": 0, "failed": 0, "rejected": 1}
    assert m.stats.last_reload_error.startswith("master upgrade refused, the config is invalid: ")
