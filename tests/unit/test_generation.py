"""The Generation state machine alone: a FakeLauncher and explicit `now` values."""

from __future__ import annotations

import logging
import signal
from typing import Any

import pytest
import yaml

from tests.support.fakes import FakeLauncher
from upgraderd.config import schema as configmod
from upgraderd.config.schema import Config
from upgraderd.core.generation import STABLE_AFTER, Generation, GenerationState as G, WorkerState as W
from upgraderd.core.seams import Exit

TERM, KILL, QUIT = signal.SIGTERM, signal.SIGKILL, signal.SIGQUIT


def make_config(count: int = 2, **sections: Any) -> Config:
    doc: dict[str, Any] = {
        "listeners": [{"name": "main", "host": "127.0.0.1", "port": 8080}],
        "workers": {"count": count, "app": "echo"},
        **sections,
    }
    return configmod.parse(yaml.safe_dump(doc), "test.yaml")


def make_gen(count: int = 2, now: float = 0.0, number: int = 1,
             launcher: FakeLauncher | None = None, **sections: Any) -> tuple[Generation, FakeLauncher]:
    launcher = launcher or FakeLauncher()
    gen = Generation(number, make_config(count, **sections), launcher, created_at=now)
    gen.start(now)
    return gen, launcher


def make_active(count: int = 2, now: float = 0.0, **sections: Any) -> tuple[Generation, FakeLauncher]:
    gen, launcher = make_gen(count, now, **sections)
    for pid in launcher.pids():
        assert gen.on_ready(pid, now)
    assert gen.state is G.ACTIVE
    return gen, launcher


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="upgraderd")


# -- STARTING -> ACTIVE --

def test_start_spawns_every_slot_in_order() -> None:
    gen, launcher = make_gen(count=3, now=5.0)
    assert launcher.spawned == [(1, 0, 100), (1, 1, 101), (1, 2, 102)]
    assert gen.state is G.STARTING
    assert gen.changed_at == 5.0
    assert set(gen.pids()) == {100, 101, 102}
    assert [(w.slot, w.pid, w.state, w.started_at) for w in gen.workers.values()] == [
        (0, 100, W.STARTING, 5.0), (1, 101, W.STARTING, 5.0), (2, 102, W.STARTING, 5.0)]
    assert launcher.signals == []


def test_all_ready_goes_active(caplog: pytest.LogCaptureFixture) -> None:
    gen, launcher = make_gen(count=3)
    assert gen.on_ready(100, 0.25)
    assert gen.on_ready(102, 0.5)
    assert gen.state is G.STARTING and gen.active_at is None
    assert gen.on_ready(101, 1.5)
    assert gen.state is G.ACTIVE
    assert gen.active_at == 1.5 and gen.changed_at == 1.5
    assert [w.ready_at for w in gen.workers.values()] == [0.25, 1.5, 0.5]
    assert "generation 1 STARTING -> ACTIVE after 1.500s" in messages(caplog)
    assert launcher.signals == []


def test_on_ready_rejects_strangers_and_repeats() -> None:
    gen, _ = make_gen(count=2)
    assert gen.on_ready(999, 1.0) is False
    assert gen.on_ready(100, 1.0) is True
    assert gen.on_ready(100, 2.0) is False          # already READY
    assert gen.workers[0].ready_at == 1.0
    assert gen.state is G.STARTING


def test_on_exit_of_a_stranger_is_not_ours() -> None:
    gen, launcher = make_gen(count=2)
    assert gen.on_exit(999, Exit(999, code=0), 1.0) is False
    assert gen.state is G.STARTING
    assert launcher.signals == []


def test_delay_mode_ready_after_delay() -> None:
    gen, _ = make_gen(count=2, ready={"mode": "delay", "after": 2, "timeout": 10})
    assert gen.next_deadline() == 2.0
    gen.tick(1.999)
    assert gen.state is G.STARTING
    assert all(w.state is W.STARTING for w in gen.workers.values())
    gen.tick(2.0)
    assert gen.state is G.ACTIVE and gen.active_at == 2.0
    assert all(w.state is W.READY and w.ready_at == 2.0 for w in gen.workers.values())


# -- STARTING -> FAILED --

def test_worker_exit_during_starting_fails_and_drains_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    gen, launcher = make_gen(count=3, drain={"timeout": 4})
    gen.on_ready(100, 0.5)
    assert gen.on_exit(101, Exit(101, code=3), 1.0)
    assert gen.state is G.FAILED
    assert gen.reason == "slot 1 (pid 101) exited at start-up: exit code 3"
    assert launcher.signals == [(100, TERM), (102, TERM)]
    assert [w.state for w in gen.workers.values()] == [W.DRAINING, W.EXITED, W.DRAINING]
    assert [w.kill_at for w in gen.workers.values()] == [5.0, None, 5.0]
    assert ("generation 1 failed: slot 1 (pid 101) exited at start-up: exit code 3; "
            "the serving generation is untouched") in messages(caplog)
    # Not SIGKILLed before the drain deadline, then exactly once.
    assert gen.next_deadline() == 5.0
    gen.tick(4.999)
    assert launcher.signals == [(100, TERM), (102, TERM)]
    gen.tick(5.0)
    gen.tick(6.0)
    assert launcher.signals == [(100, TERM), (102, TERM), (100, KILL), (102, KILL)]
    assert gen.next_deadline() is None
    # FAILED -> RETIRED once every worker is gone.
    gen.on_exit(100, Exit(100, signal=9), 6.5)
    assert gen.state is G.FAILED
    gen.on_exit(102, Exit(102, signal=9), 7.0)
    assert gen.state is G.RETIRED and gen.changed_at == 7.0


def test_ready_timeout_fails() -> None:
    gen, launcher = make_gen(count=2, now=10.0, ready={"timeout": 5})
    gen.on_ready(100, 11.0)
    assert gen.next_deadline() == 15.0
    gen.tick(14.999)
    assert gen.state is G.STARTING
    gen.tick(15.0)
    assert gen.state is G.FAILED
    assert gen.reason == "not ready within 5s (slots 1 never sent READY=1)"
    assert launcher.signals == [(100, TERM), (101, TERM)]


def test_spawn_error_fails_at_once_and_stops_spawning() -> None:
    launcher = FakeLauncher(fail_slots={1})
    gen, _ = make_gen(count=3, launcher=launcher)
    assert launcher.spawned == [(1, 0, 100)]
    assert launcher.failures == [(1, 1)]            # slot 2 is never tried
    assert gen.state is G.FAILED
    assert gen.reason == "slot 1: cannot start 'worker': slot 1 refused"
    assert launcher.signals == [(100, TERM)]
    assert gen.workers[1].state is W.EXITED and gen.workers[1].pid is None
    assert 2 not in gen.workers


def test_spawn_error_of_the_first_slot_retires_at_once() -> None:
    gen, launcher = make_gen(count=2, launcher=FakeLauncher(fail_slots={0}))
    assert gen.state is G.RETIRED
    assert launcher.spawned == [] and launcher.signals == []


def test_illegal_transition_raises() -> None:
    gen, _ = make_gen(count=1, launcher=FakeLauncher(fail_slots={0}))
    with pytest.raises(RuntimeError, match="generation 1: illegal RETIRED -> DRAINING"):
        gen.drain(1.0)


# -- ACTIVE: crashes and respawns --

def crash(gen: Generation, launcher: FakeLauncher, slot: int, now: float) -> float:
    """Crash `slot` at `now`; return the respawn time the generation chose."""
    pid = launcher.pid_of(slot)
    assert gen.on_exit(pid, Exit(pid, code=1), now)
    w = gen.workers[slot]
    assert w.state is W.BACKOFF
    return w.respawn_at


def test_crash_in_active_respawns_into_the_same_slot(caplog: pytest.LogCaptureFixture) -> None:
    gen, launcher = make_active(count=2, restart={"backoff": 0.25})
    at = crash(gen, launcher, 1, 1.0)
    assert at == 1.25
    assert gen.state is G.ACTIVE
    assert "generation 1 slot 1: worker died (pid 101 exit code 1); respawning in 0.25s" in messages(caplog)
    assert gen.next_deadline() == 1.25
    gen.tick(1.2499)
    assert launcher.spawned == [(1, 0, 100), (1, 1, 101)]
    gen.tick(1.25)
    assert launcher.spawned == [(1, 0, 100), (1, 1, 101), (1, 1, 102)]
    w = gen.workers[1]
    assert (w.pid, w.state, w.started_at, w.crashes) == (102, W.STARTING, 1.25, 1)
    assert gen.workers[0].pid == 100 and gen.workers[0].state is W.READY
    assert launcher.signals == []
    assert gen.on_ready(102, 1.5) and w.state is W.READY


def test_backoff_doubles_and_is_capped() -> None:
    gen, launcher = make_active(count=1, restart={"backoff": 0.25, "max_backoff": 1.5, "crash_loop": 10})
    now, delays = 0.0, []
    for _ in range(6):
        now += 0.5                                   # quick crash: well under STABLE_AFTER
        at = crash(gen, launcher, 0, now)
        delays.append(at - now)
        gen.tick(at)
        now = at
    assert delays == [0.25, 0.5, 1.0, 1.5, 1.5, 1.5]
    assert gen.workers[0].crashes == 6
    assert len(launcher.spawned) == 7


def test_stable_worker_resets_the_crash_count() -> None:
    gen, launcher = make_active(count=1, restart={"backoff": 0.25, "max_backoff": 8, "crash_loop": 10})
    at = crash(gen, launcher, 0, 1.0)
    gen.tick(at)                                     # respawned at 1.25
    at = crash(gen, launcher, 0, 2.0)
    assert (at - 2.0, gen.workers[0].crashes) == (0.5, 2)
    gen.tick(at)                                     # respawned at 2.5
    # Up for exactly STABLE_AFTER: not part of the crash loop.
    at = crash(gen, launcher, 0, 2.5 + STABLE_AFTER)
    assert (at - (2.5 + STABLE_AFTER), gen.workers[0].crashes) == (0.25, 1)


def test_crash_loop_is_fatal_after_crash_loop_crashes(caplog: pytest.LogCaptureFixture) -> None:
    gen, launcher = make_active(count=2, restart={"backoff": 0.25, "max_backoff": 1, "crash_loop": 3})
    now = 0.0
    for _ in range(2):
        now += 0.5
        now = crash(gen, launcher, 0, now)
        gen.tick(now)
    pid = launcher.pid_of(0)
    gen.on_exit(pid, Exit(pid, code=1), now + 0.5)   # the 3rd consecutive quick crash
    assert gen.workers[0].state is W.FATAL
    assert any(m.startswith("generation 1 slot 0: crash loop (3 crashes in a row") for m in messages(caplog))


def test_fatal_slot_is_never_respawned(caplog: pytest.LogCaptureFixture) -> None:
    gen, launcher = make_active(count=2, restart={"backoff": 0.25, "max_backoff": 1, "crash_loop": 3})
    now = 0.0
    for _ in range(10):                              # crash slot 0 until it is given up
        now += 0.5
        pid = launcher.pid_of(0)
        gen.on_exit(pid, Exit(pid, code=1), now)
        if gen.workers[0].state is W.FATAL:
            break
        now = gen.workers[0].respawn_at
        gen.tick(now)
    assert gen.workers[0].state is W.FATAL
    assert gen.workers[0].pid is None
    assert sum(1 for m in messages(caplog) if "crash loop" in m) == 1
    spawned = list(launcher.spawned)
    assert gen.next_deadline() is None
    gen.tick(now + 3600)
    assert launcher.spawned == spawned
    assert gen.state is G.ACTIVE
    assert gen.workers[1].state is W.READY and gen.workers[1].pid == 101
    assert set(gen.pids()) == {101}
    # Draining forgets the FATAL slot and signals only the live worker.
    gen.drain(now + 3601)
    assert gen.workers[0].state is W.EXITED
    assert launcher.signals == [(101, TERM)]


def test_failed_respawns_back_off_and_count_as_crashes() -> None:
    gen, launcher = make_active(count=1, restart={"backoff": 0.25, "max_backoff": 8, "crash_loop": 3})
    at = crash(gen, launcher, 0, 100.0)             # up for 100s: a first, isolated crash
    assert at == 100.25
    launcher.fail_slots.add(0)
    gen.tick(at)                                     # respawn fails: the 2nd consecutive failure
    w = gen.workers[0]
    assert (w.state, w.crashes, w.respawn_at) == (W.BACKOFF, 2, 100.75)


# -- ACTIVE -> DRAINING -> RETIRED --

def test_drain_signals_every_worker_then_sigkill_once_at_timeout(caplog: pytest.LogCaptureFixture) -> None:
    gen, launcher = make_active(count=2, drain={"timeout": 3})
    gen.drain(10.0)
    assert gen.state is G.DRAINING and gen.changed_at == 10.0
    assert launcher.signals == [(100, TERM), (101, TERM)]
    assert gen.next_deadline() == 13.0
    gen.on_exit(100, Exit(100, code=0), 11.0)
    assert gen.state is G.DRAINING
    gen.tick(12.999)
    assert launcher.signals == [(100, TERM), (101, TERM)]
    gen.tick(13.0)
    gen.tick(14.0)
    gen.tick(100.0)
    assert launcher.signals == [(100, TERM), (101, TERM), (101, KILL)]
    assert ("generation 1 slot 1: pid 101 still running after drain timeout 3s; SIGKILL"
            in messages(caplog))
    gen.on_exit(101, Exit(101, signal=9), 100.5)
    assert gen.state is G.RETIRED
    assert "generation 1 DRAINING -> RETIRED after 90.500s" in messages(caplog)


def test_drain_retires_when_all_exited_before_timeout() -> None:
    gen, launcher = make_active(count=2, drain={"timeout": 3})
    gen.drain(10.0)
    gen.on_exit(101, Exit(101, code=0), 10.5)
    gen.on_exit(100, Exit(100, code=0), 11.0)
    assert gen.state is G.RETIRED and gen.changed_at == 11.0
    gen.tick(20.0)
    assert launcher.signals == [(100, TERM), (101, TERM)]


def test_drain_uses_the_configured_signal() -> None:
    gen, launcher = make_active(count=2, drain={"signal": "QUIT"})
    gen.drain(1.0)
    assert launcher.signals == [(100, QUIT), (101, QUIT)]


def test_drain_with_a_slot_in_backoff_does_not_respawn_it() -> None:
    gen, launcher = make_active(count=2, restart={"backoff": 1})
    crash(gen, launcher, 0, 1.0)
    gen.drain(1.5)
    assert gen.workers[0].state is W.EXITED
    assert launcher.signals == [(101, TERM)]
    gen.tick(5.0)
    assert launcher.spawned == [(1, 0, 100), (1, 1, 101)]
    gen.on_exit(101, Exit(101, code=0), 6.0)
    assert gen.state is G.RETIRED


def test_drain_of_a_starting_generation_at_shutdown() -> None:
    gen, launcher = make_gen(count=2)
    gen.drain(1.0)
    assert gen.state is G.DRAINING
    assert launcher.signals == [(100, TERM), (101, TERM)]


def test_stop_fast_signals_every_live_worker_and_kills_after_grace() -> None:
    gen, launcher = make_active(count=3)
    gen.on_exit(101, Exit(101, code=1), 1.0)         # now in BACKOFF, no pid
    gen.stop_fast(2.0, signal.SIGINT, 1.0)
    assert gen.state is G.DRAINING
    assert launcher.signals == [(100, signal.SIGINT), (102, signal.SIGINT)]
    assert gen.next_deadline() == 3.0
    gen.tick(3.0)
    assert launcher.signals[2:] == [(100, signal.SIGKILL), (102, signal.SIGKILL)]


def test_add_slot_spawns_a_new_slot_that_readies_within_the_active_generation() -> None:
    gen, launcher = make_active(count=2)
    assert gen.add_slot(1.0) == 2
    assert launcher.spawned[-1] == (1, 2, 102)
    assert gen.state is G.ACTIVE and gen.workers[2].state is W.STARTING
    assert gen.serving_slots() == [0, 1, 2]
    assert gen.on_ready(102, 1.5)
    assert gen.workers[2].state is W.READY


def test_remove_slot_drains_the_highest_slot_then_forgets_it() -> None:
    gen, launcher = make_active(count=3, drain={"timeout": "5s"})
    assert gen.remove_slot(1.0) == 2
    assert launcher.signals == [(102, signal.SIGTERM)]
    assert gen.serving_slots() == [0, 1]           # its socket may close at once
    assert gen.next_deadline() == 6.0
    gen.tick(6.0)
    assert launcher.signals[-1] == (102, signal.SIGKILL)
    assert gen.on_exit(102, Exit(102, signal=9), 6.1)
    assert sorted(gen.workers) == [0, 1] and gen.state is G.ACTIVE
    assert gen.remove_slot(7.0) == 1
    assert gen.remove_slot(7.0) is None            # never below one worker


def test_remove_slot_in_backoff_is_forgotten_at_once() -> None:
    gen, launcher = make_active(count=2)
    gen.on_exit(101, Exit(101, code=1), 1.0)
    assert gen.remove_slot(1.0) == 1
    assert sorted(gen.workers) == [0] and launcher.signals == []
    gen.tick(10.0)
    assert len(launcher.spawned) == 2              # the back-off respawn never happens


def test_fatal_slot_no_longer_serves_its_socket() -> None:
    gen, _ = make_active(count=2, restart={"crash_loop": 1})
    gen.on_exit(101, Exit(101, code=1), 1.0)
    assert gen.workers[1].state is W.FATAL
    assert gen.serving_slots() == [0]
