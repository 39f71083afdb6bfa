"""The Master loop with a fake clock, fake processes and a fake notify socket.

Each test writes a config, calls `master.start()`, then scripts notify messages,
exits and clock moves and calls `master.step(signals)`, as `run()` would after
`select` returned.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.fakes import FakeClock, FakeExec, FakeNotify, FakeProcessAPI, fake_system
from tests.support.upgraderd_proc import free_port
from tests.unit.conftest import RigMaker, passes
from upgraderd.core.generation import GenerationState as G, WorkerState as W
from upgraderd.core.durations import Durations
from upgraderd.core.master import FAST_STOP_GRACE, Master, assemble

HUP, TERM, INT, KILL, QUIT = signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGKILL, signal.SIGQUIT
T0 = 100.0


def observed(d: Durations) -> tuple[int, float]:
    """Return (count, sum) of a duration histogram: each test's samples are exact."""
    return d.count, d.total


class Rig:
    """A Master wired to fakes, plus helpers to script it."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "upgraderd.yaml"
        self.port = free_port()
        self.clock = FakeClock(T0)
        self.procs = FakeProcessAPI()
        self.notify = FakeNotify()
        self.execs = FakeExec()
        self.told: list[str] = []   # what the master told systemd, in order
        self.master = assemble(str(self.path), fake_system(self.procs, self.notify, execs=self.execs,
                                                           tell_systemd=self.told.append), clock=self.clock)

    def write(self, count: int = 2, **sections: Any) -> None:
        doc: dict[str, Any] = {
            "listeners": [{"name": "main", "host": "127.0.0.1", "port": self.port}],
            "workers": {"count": count, "app": "echo"},
            **sections,
        }
        self.path.write_text(yaml.safe_dump(doc, sort_keys=False))

    def start(self, count: int = 2, **sections: Any) -> Master:
        self.write(count, **sections)
        self.master.start()
        return self.master

    def step(self, *signals: signal.Signals, at: float | None = None) -> None:
        """One pass, then the passes the master asks for at once, as run() does."""
        if at is not None:
            self.clock.set(at)
        passes(self.master, set(signals))

    def ready(self, *pids: int, at: float | None = None) -> None:
        self.notify.ready(*pids)
        self.step(at=at)

    def states(self) -> list[tuple[int, G]]:
        return [(g.number, g.state) for g in self.master.generations]

    def serving(self, count: int = 2, **sections: Any) -> Master:
        """Start generation 1 at T0 and make it ACTIVE."""
        self.start(count, **sections)
        self.ready(*self.procs.pids(1))
        assert self.states() == [(1, G.ACTIVE)]
        return self.master


@pytest.fixture
def rig(rigs: RigMaker[Rig]) -> Rig:
    return rigs(Rig)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


# -- start-up --

def test_start_spawns_generation_1_with_the_socket_activation_env(rig: Rig) -> None:
    m = rig.start(count=3)
    assert rig.states() == [(1, G.STARTING)]
    assert [s.pid for s in rig.procs.spawns] == [1000, 1001, 1002]
    fds = []
    for slot, s in enumerate(rig.procs.spawns):
        assert s.argv == (sys.executable, "-m", "upgraderd.apps.echo")
        assert {k: s.env[k] for k in ("LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "UPGRADERD_GENERATION",
                                      "UPGRADERD_SLOT", "UPGRADERD_DRAIN_SIGNAL")} == {
            "LISTEN_FDS": "1", "LISTEN_FDNAMES": "main", "NOTIFY_SOCKET": "@upgraderd-fake-notify",
            "UPGRADERD_GENERATION": "1", "UPGRADERD_SLOT": str(slot), "UPGRADERD_DRAIN_SIGNAL": "TERM"}
        assert "LISTEN_PID" not in s.env
        assert len(s.fds) == 1
        fds.append(s.fds[0])
        assert s.cwd is None
    assert len(set(fds)) == 3                          # reuseport: one socket per slot
    assert len(m.system.listeners.keys()) == 3
    assert rig.procs.kills == []


def test_all_ready_goes_active(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    m = rig.start(count=3)
    a, b, c = rig.procs.pids(1)
    rig.ready(a, c, at=T0 + 0.25)
    assert rig.states() == [(1, G.STARTING)]
    assert m.active is None and m.starting is m.generations[0]
    rig.ready(b, at=T0 + 0.5)
    assert rig.states() == [(1, G.ACTIVE)]
    assert m.active is m.generations[0] and m.active.active_at == T0 + 0.5
    assert "serving: generation 1 ACTIVE 0.500s after start" in messages(caplog)
    assert m.stats.reloads == {"success": 0, "failed": 0, "rejected": 0}
    assert m.stats.notify_rejected == 0
    assert m.exit_code == 0
    assert rig.procs.kills == []


class Said(logging.Handler):
    """Record each outcome line with what the published snapshot showed when it was logged."""

    def __init__(self, m: Master) -> None:
        super().__init__()
        self.m, self.lines = m, []

    def emit(self, record: logging.LogRecord) -> None:
        said = [p for p in ("serving", "reload done", "reload failed") if record.getMessage().startswith(p)]
        snap = self.m.publisher.published
        if said:   # (a failed assert would be swallowed by logging: record what was there instead)
            self.lines.append((said[0], snap.active_generation if snap else None,
                               dict(snap.stats.reloads) if snap else None))


def test_outcomes_are_said_only_once_the_snapshot_that_shows_them_is_published(rig: Rig) -> None:
    # CI: "serving: generation 1 ACTIVE" was in the log, and /readyz still answered "no ACTIVE
    # generation": the line was written mid-pass, the snapshot at the pass's end.
    m = rig.start(count=2)
    said = Said(m)
    logging.getLogger("upgraderd").addHandler(said)
    try:
        rig.ready(*rig.procs.pids(1), at=T0 + 0.5)
        rig.step(HUP, at=T0 + 1)
        rig.ready(*rig.procs.pids(2), at=T0 + 1.5)
        rig.step(HUP, at=T0 + 2)
        rig.procs.exit(rig.procs.pids(3)[0], code=1)
        rig.step(at=T0 + 2.5)
    finally:
        logging.getLogger("upgraderd").removeHandler(said)
    assert said.lines == [
        ("serving", 1, {"success": 0, "failed": 0, "rejected": 0}),
        ("reload done", 2, {"success": 1, "failed": 0, "rejected": 0}),
        ("reload failed", 2, {"success": 1, "failed": 1, "rejected": 0}),
    ]


def test_first_generation_failing_sets_exit_code_1(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    m = rig.start(count=2)
    a, b = rig.procs.pids(1)
    rig.procs.exit(a, code=2)
    rig.step(at=T0 + 0.1)
    assert rig.states() == [(1, G.FAILED)]
    assert m.exit_code == 1
    assert rig.procs.kills == [(b, TERM)]
    assert "the first generation failed (slot 0 (pid 1000) exited at start-up: exit code 2); stopping" \
        in messages(caplog)
    assert m.stats.reloads == {"success": 0, "failed": 0, "rejected": 0}
    rig.step(HUP, at=T0 + 0.2)                         # stopping: no reload
    assert len(rig.procs.spawns) == 2
    rig.procs.exit(b, code=0)
    rig.step(at=T0 + 0.3)
    assert m.generations == []
    assert m.exit_code == 1
    assert m.system.listeners.keys() == set()


def test_first_generation_spawn_error_sets_exit_code_1(rig: Rig) -> None:
    rig.procs.fail_spawn(generation=1, slot=0)
    m = rig.start(count=2)
    assert rig.procs.spawns == []
    assert rig.states() == [(1, G.RETIRED)]
    rig.step()
    assert m.exit_code == 1
    assert m.generations == []


# -- reload --

def test_predecessor_drained_only_after_successor_active(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    m = rig.start(count=2)
    old = rig.procs.pids(1)
    rig.ready(*old, at=T0 + 1)
    rig.step(HUP, at=T0 + 10)
    assert rig.states() == [(1, G.ACTIVE), (2, G.STARTING)]
    new = rig.procs.pids(2)
    assert new == [1002, 1003]
    # Gen 2 slot i inherits gen 1 slot i's socket.
    assert [rig.procs.spawn_of(p).fds for p in new] == [rig.procs.spawn_of(p).fds for p in old]
    rig.ready(new[0], at=T0 + 11)
    rig.step(at=T0 + 12)
    assert rig.states() == [(1, G.ACTIVE), (2, G.STARTING)]
    assert rig.procs.kills == []                       # nothing drained while gen 2 is not fully ready
    rig.ready(new[1], at=T0 + 12.5)
    assert rig.states() == [(1, G.DRAINING), (2, G.ACTIVE)]
    assert rig.procs.kills == [(old[0], TERM), (old[1], TERM)]
    assert m.stats.reloads == {"success": 1, "failed": 0, "rejected": 0}
    assert observed(m.stats.reload_durations) == (1, 2.5)
    assert m.stats.last_reload_ok is True
    assert "reload done: generation 2 ACTIVE 2.500s after HUP" in messages(caplog)
    assert m.config is m.generations[1].config


def test_draining_generation_retires_when_all_exited(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    m = rig.start(count=2)
    old = rig.procs.pids(1)
    rig.ready(*old)
    rig.step(HUP, at=T0 + 1)
    rig.ready(*rig.procs.pids(2), at=T0 + 2)
    rig.procs.exit(old[0], code=0)
    rig.step(at=T0 + 3)
    assert rig.states() == [(1, G.DRAINING), (2, G.ACTIVE)]
    rig.procs.exit(old[1], code=0)
    rig.step(at=T0 + 4)
    assert rig.states() == [(2, G.ACTIVE)]
    assert "generation 1 DRAINING -> RETIRED after 2.000s" in messages(caplog)
    assert m.stats.worker_exits == {"clean": 2, "error": 0, "signal": 0}
    assert rig.procs.kills == [(old[0], TERM), (old[1], TERM)]
    assert len(m.system.listeners.keys()) == 2                # the sockets outlive the generations


def test_drain_duration_is_measured_from_the_start_of_the_drain(rig: Rig) -> None:
    m = rig.start(count=1)
    old = rig.procs.pids(1)
    rig.ready(*old)
    rig.step(HUP, at=T0 + 1)
    rig.ready(*rig.procs.pids(2), at=T0 + 2)           # gen 1 DRAINING from T0 + 2
    rig.procs.exit(old[0], code=0)
    rig.step(at=T0 + 5)
    assert rig.states() == [(2, G.ACTIVE)]
    assert observed(m.stats.drain_durations) == (1, 3.0)


def test_drain_timeout_sigkills_exactly_once(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    m = rig.start(count=2, drain={"timeout": 5})
    old = rig.procs.pids(1)
    rig.ready(*old)
    rig.step(HUP, at=T0 + 1)
    rig.ready(*rig.procs.pids(2), at=T0 + 2)
    rig.procs.exit(old[0], code=0)
    rig.step(at=T0 + 3)
    rig.step(at=T0 + 6.999)
    assert rig.procs.kills == [(old[0], TERM), (old[1], TERM)]
    assert m.generations[0].next_deadline() == T0 + 7
    rig.step(at=T0 + 7)
    rig.step(at=T0 + 8)
    rig.step(at=T0 + 60)
    assert rig.procs.kills == [(old[0], TERM), (old[1], TERM), (old[1], KILL)]
    assert "generation 1 slot 1: pid 1001 still running after drain timeout 5s; SIGKILL" in messages(caplog)
    rig.procs.exit(old[1], signal=9)
    rig.step(at=T0 + 60.5)
    assert rig.states() == [(2, G.ACTIVE)]
    assert m.stats.worker_exits == {"clean": 1, "error": 0, "signal": 1}


def test_hups_during_starting_coalesce_into_one_more_generation(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    m = rig.start(count=1)
    rig.ready(*rig.procs.pids(1))
    rig.step(HUP, at=T0 + 1)
    assert rig.states() == [(1, G.ACTIVE), (2, G.STARTING)]
    rig.step(HUP, at=T0 + 2)
    rig.step(HUP, at=T0 + 3)
    rig.step(HUP, at=T0 + 4)
    assert rig.states() == [(1, G.ACTIVE), (2, G.STARTING)]
    assert messages(caplog).count("received SIGHUP: reload queued, generation 2 is still starting") == 3
    assert len(rig.procs.spawns) == 2
    rig.told.clear()
    rig.ready(*rig.procs.pids(2), at=T0 + 5)
    # Gen 2 settles and its outcome is said; the queued HUPs start exactly one more
    # generation in the pass right after (no wait: Rig.step runs it, the loop's timeout is 0).
    assert rig.states() == [(1, G.DRAINING), (2, G.ACTIVE), (3, G.STARTING)]
    assert rig.procs.kills == [(1000, TERM)]
    # systemd (Type=notify-reload) hears the first reload end before the next begins, and the
    # log says it in the same order.
    assert [t.partition("\n")[0] for t in rig.told] == ["READY=1", "RELOADING=1"]
    said = messages(caplog)
    assert said.index("reload done: generation 2 ACTIVE 4.000s after HUP; another reload is queued") < \
        max(i for i, line in enumerate(said) if line.startswith("reload: "))   # gen 3's plan
    assert m.timeout() > 0.0
    rig.step(at=T0 + 6)
    rig.step(at=T0 + 7)
    assert [s.generation for s in rig.procs.spawns] == [1, 2, 3]
    rig.ready(*rig.procs.pids(3), at=T0 + 8)
    rig.step(at=T0 + 9)
    assert rig.states() == [(1, G.DRAINING), (2, G.DRAINING), (3, G.ACTIVE)]
    assert [s.generation for s in rig.procs.spawns] == [1, 2, 3]
    assert m.stats.reloads == {"success": 2, "failed": 0, "rejected": 0}
    # Gen 3's reload is measured from the first HUP that queued it.
    assert observed(m.stats.reload_durations) == (2, 10.0)


def test_hup_during_first_generation_start_is_queued(rig: Rig) -> None:
    m = rig.start(count=1)
    rig.step(HUP, at=T0 + 0.5)
    assert rig.states() == [(1, G.STARTING)]
    rig.ready(*rig.procs.pids(1), at=T0 + 1)
    assert rig.states() == [(1, G.ACTIVE), (2, G.STARTING)]
    rig.ready(*rig.procs.pids(2), at=T0 + 3)
    assert observed(m.stats.reload_durations) == (1, 2.5)


def test_reload_duration_is_measured_from_the_hup(rig: Rig) -> None:
    m = rig.serving(count=2)
    rig.step(HUP, at=T0 + 10)
    a, b = rig.procs.pids(2)
    rig.ready(a, at=T0 + 10.25)
    rig.ready(b, at=T0 + 10.75)
    assert observed(m.stats.reload_durations) == (1, 0.75)
    rig.step(HUP, at=T0 + 20)
    rig.ready(*rig.procs.pids(3), at=T0 + 21.5)
    assert observed(m.stats.reload_durations) == (2, 2.25)


def test_worker_exit_during_starting_fails_reload(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    m = rig.start(count=2, drain={"timeout": 4})
    old = rig.procs.pids(1)
    rig.ready(*old)
    rig.step(HUP, at=T0 + 1)
    a, b = rig.procs.pids(2)
    rig.ready(a, at=T0 + 1.5)
    rig.procs.exit(b, code=1)
    rig.step(at=T0 + 2)
    assert rig.states() == [(1, G.ACTIVE), (2, G.FAILED)]
    assert rig.procs.kills == [(a, TERM)]
    assert m.stats.reloads == {"success": 0, "failed": 1, "rejected": 0}
    assert m.stats.last_reload_ok is False
    assert m.stats.last_reload_error == "generation 2: slot 1 (pid 1003) exited at start-up: exit code 1"
    assert ("reload failed, still serving generation 1: "
            "generation 2: slot 1 (pid 1003) exited at start-up: exit code 1") in messages(caplog)
    rig.step(at=T0 + 5.999)
    assert rig.procs.kills == [(a, TERM)]
    rig.step(at=T0 + 6)
    rig.step(at=T0 + 7)
    assert rig.procs.kills == [(a, TERM), (a, KILL)]
    rig.procs.exit(a, signal=9)
    rig.step(at=T0 + 7.5)
    assert rig.states() == [(1, G.ACTIVE)]
    # The serving generation was never touched.
    assert rig.procs.kills_of(old) == []
    assert [w.state for w in m.generations[0].workers.values()] == [W.READY, W.READY]
    assert m.stats.reloads == {"success": 0, "failed": 1, "rejected": 0}
    assert observed(m.stats.reload_durations) == (0, 0)
    assert m.config is m.generations[0].config


def test_ready_timeout_fails_reload(rig: Rig) -> None:
    m = rig.start(count=2, ready={"timeout": 3})
    old = rig.procs.pids(1)
    rig.ready(*old)
    rig.step(HUP, at=T0 + 1)
    a, b = rig.procs.pids(2)
    rig.ready(b, at=T0 + 2)
    rig.step(at=T0 + 3.999)
    assert rig.states() == [(1, G.ACTIVE), (2, G.STARTING)]
    rig.step(at=T0 + 4)
    assert rig.states() == [(1, G.ACTIVE), (2, G.FAILED)]
    assert rig.procs.kills == [(a, TERM), (b, TERM)]
    assert m.stats.reloads == {"success": 0, "failed": 1, "rejected": 0}
    assert m.stats.last_reload_error == "generation 2: not ready within 3s (slots 0 never sent READY=1)"


def test_spawn_error_fails_reload(rig: Rig) -> None:
    m = rig.serving(count=3)
    rig.procs.fail_spawn(generation=2, slot=1, message="cannot start 'x': Permission denied")
    rig.step(HUP, at=T0 + 1)
    assert [s.generation for s in rig.procs.spawns] == [1, 1, 1, 2]
    first = rig.procs.pids(2)[0]
    assert rig.states() == [(1, G.ACTIVE), (2, G.FAILED)]
    assert rig.procs.kills == [(first, TERM)]
    assert m.stats.reloads == {"success": 0, "failed": 1, "rejected": 0}
    assert m.stats.last_reload_error == "generation 2: slot 1: cannot start 'x': Permission denied"
    rig.procs.exit(first, signal=15)
    rig.step(at=T0 + 2)
    assert rig.states() == [(1, G.ACTIVE)]
    # The next HUP rolls a healthy generation.
    rig.step(HUP, at=T0 + 3)
    rig.ready(*rig.procs.pids(3), at=T0 + 4)
    assert rig.states() == [(1, G.DRAINING), (3, G.ACTIVE)]
    assert m.stats.reloads == {"success": 1, "failed": 1, "rejected": 0}


def test_invalid_config_on_hup_is_rejected(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    m = rig.serving(count=2)
    good = rig.path.read_text()
    config = m.config
    assert good.splitlines()[3].startswith("  port: ")
    rig.path.write_text(good.replace("  port:", "  mood: fast\n  port:"))   # line 4
    rig.step(HUP, at=T0 + 1)
    assert rig.states() == [(1, G.ACTIVE)]
    assert len(rig.procs.spawns) == 2
    assert rig.procs.kills == []
    assert m.stats.reloads == {"success": 0, "failed": 0, "rejected": 1}
    assert m.stats.last_reload_ok is False
    assert m.stats.last_reload_error == (
        f"{rig.path}:4:3: listeners[0].mood: unknown key (did you mean 'mode'?); "
        "allowed: name, host, port, path, mode, backlog, owner, group, permissions, protocol, flows")
    assert f"reload failed, still serving generation 1: {m.stats.last_reload_error}" in messages(caplog)
    assert m.config is config
    # Fixed: the next HUP works.
    rig.path.write_text(good)
    rig.step(HUP, at=T0 + 2)
    assert rig.states() == [(1, G.ACTIVE), (2, G.STARTING)]
    assert m.stats.reloads == {"success": 0, "failed": 0, "rejected": 1}


def test_unparseable_config_on_hup_is_rejected(rig: Rig) -> None:
    m = rig.serving(count=1)
    rig.path.write_text("listeners: [\n")
    rig.step(HUP, at=T0 + 1)
    assert rig.states() == [(1, G.ACTIVE)]
    assert m.stats.reloads["rejected"] == 1
    assert m.stats.last_reload_error == f"{rig.path}:2:1: YAML syntax error: expected the node content, " \
                                        "but found '<stream end>' (while parsing a flow node at 2:1)"


# -- ACTIVE: crashes --

def test_crash_in_active_respawns_into_the_same_slot_after_backoff(rig: Rig) -> None:
    m = rig.serving(count=2, restart={"backoff": 0.25, "max_backoff": 1})
    a, b = rig.procs.pids(1)
    rig.procs.exit(b, signal=11)
    rig.step(at=T0 + 1)
    assert m.generations[0].workers[1].state is W.BACKOFF
    assert m.stats.worker_exits == {"clean": 0, "error": 0, "signal": 1}
    rig.step(at=T0 + 1.2499)
    assert len(rig.procs.spawns) == 2
    rig.step(at=T0 + 1.25)
    assert len(rig.procs.spawns) == 3
    new = rig.procs.spawns[-1]
    assert (new.pid, new.generation, new.slot) == (1002, 1, 1)
    assert new.fds == rig.procs.spawn_of(b).fds
    assert m.stats.worker_restarts == 1
    assert rig.procs.kills == []
    assert rig.states() == [(1, G.ACTIVE)]
    rig.ready(1002, at=T0 + 1.5)
    assert m.generations[0].workers[1].state is W.READY
    assert m.stats.notify_rejected == 0


def test_crash_backoff_doubles_capped_and_resets_after_stable(rig: Rig) -> None:
    m = rig.serving(count=1, restart={"backoff": 0.25, "max_backoff": 1.5, "crash_loop": 20})
    w = m.generations[0].workers[0]
    now, delays = T0, []
    for _ in range(5):
        now += 0.5
        rig.procs.exit(w.pid, code=1)                # type: ignore[arg-type]
        rig.step(at=now)
        delays.append(w.respawn_at - now)
        rig.step(at=w.respawn_at)
        now = w.respawn_at
    assert delays == [0.25, 0.5, 1.0, 1.5, 1.5]
    assert m.stats.worker_restarts == 5
    # Up for 10 s (STABLE_AFTER): the count starts over.
    now += 10
    rig.procs.exit(w.pid, code=1)                    # type: ignore[arg-type]
    rig.step(at=now)
    assert (w.crashes, w.respawn_at - now) == (1, 0.25)


def test_crash_loop_goes_fatal_and_stops_respawning(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    m = rig.serving(count=2, restart={"backoff": 0.25, "max_backoff": 0.5, "crash_loop": 2})
    w = m.generations[0].workers[0]
    now = T0
    for _ in range(10):
        now += 0.5
        rig.procs.exit(w.pid, code=1)                # type: ignore[arg-type]
        rig.step(at=now)
        if w.state is W.FATAL:
            break
        rig.step(at=w.respawn_at)
        now = w.respawn_at
    assert w.state is W.FATAL
    assert sum("crash loop" in msg for msg in messages(caplog)) == 1
    spawns = len(rig.procs.spawns)
    rig.step(at=now + 3600)
    assert len(rig.procs.spawns) == spawns
    assert rig.states() == [(1, G.ACTIVE)]
    # A HUP replaces the crippled generation.
    rig.step(HUP, at=now + 3601)
    rig.ready(*rig.procs.pids(2), at=now + 3602)
    assert rig.states() == [(1, G.DRAINING), (2, G.ACTIVE)]
    assert rig.procs.kills == [(1001, TERM)]


# -- notify --

def test_notify_from_strangers_and_garbage_is_counted(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    m = rig.start(count=2)
    a, b = rig.procs.pids(1)
    rig.notify.send(4242, b"READY=1")              # not a worker
    rig.notify.send(0, b"READY=1")                 # no credentials
    rig.notify.send(a, b"\xff\xfe")                # not UTF-8
    rig.notify.send(a, b"hello")                   # not KEY=VALUE
    rig.notify.send(a, b"")                        # empty
    rig.notify.send(a, b"READY=1\nSTATUS=ok")      # fine
    rig.step(at=T0 + 1)
    assert m.stats.notify_rejected == 5
    assert m.generations[0].workers[0].state is W.READY
    assert m.generations[0].workers[1].state is W.STARTING
    # One warning for the burst (the first datagram); the rest are only counted,
    # and summarised once the rate-limit interval has passed.
    warnings = [r.getMessage() for r in caplog.records if "notify message" in r.getMessage()]
    assert warnings == ["ignored notify message from pid 4242: not a worker (further ones are counted "
                        "in upgraderd_notify_rejected_total, and summarised every 10s)"]
    rig.ready(b, at=T0 + 2)
    assert rig.states() == [(1, G.ACTIVE)]
    # A worker that has exited (and been reaped) is a stranger too.
    rig.procs.exit(b, code=0)
    rig.step(at=T0 + 3)
    rig.notify.send(b, b"READY=1")
    rig.step(at=T0 + 3.5)
    assert m.stats.notify_rejected == 5 + 1
    rig.step(at=T0 + 11)
    assert "ignored 5 more notify message(s) in the last 10s" in messages(caplog)
    rig.notify.send(a, b"hello")
    rig.step(at=T0 + 21.5)
    assert "ignored bad notify message from pid 1000: not a KEY=VALUE line: 'hello' (further ones are " \
        "counted in upgraderd_notify_rejected_total, and summarised every 10s)" in messages(caplog)


def test_a_notify_flood_writes_a_bounded_number_of_log_lines(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    m = rig.start(count=1)
    for second in range(60):
        for i in range(1000):
            rig.notify.send(5000 + i, b"READY=1")
        rig.step(at=T0 + 1 + second)
    assert m.stats.notify_rejected == 60_000
    lines = [r for r in caplog.records if "notify message" in r.getMessage()]
    assert 1 <= len(lines) <= 7          # one warning, then a summary every 10 s


def test_ready_mode_delay(rig: Rig) -> None:
    m = rig.start(count=2, ready={"mode": "delay", "after": 2})
    rig.step(at=T0 + 1.999)
    assert rig.states() == [(1, G.STARTING)]
    rig.step(at=T0 + 2)
    assert rig.states() == [(1, G.ACTIVE)]
    rig.step(HUP, at=T0 + 5)
    rig.step(at=T0 + 6.999)
    assert rig.states() == [(1, G.ACTIVE), (2, G.STARTING)]
    assert rig.procs.kills == []
    rig.step(at=T0 + 7)
    assert rig.states() == [(1, G.DRAINING), (2, G.ACTIVE)]
    assert observed(m.stats.reload_durations) == (1, 2.0)


# -- stopping --

def test_term_drains_everything_and_generations_empty(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    m = rig.start(count=2, drain={"timeout": 5})
    old = rig.procs.pids(1)
    rig.ready(*old)
    rig.step(HUP, at=T0 + 1)
    new = rig.procs.pids(2)
    rig.ready(new[0], at=T0 + 2)                   # gen 2 still STARTING
    rig.step(TERM, at=T0 + 3)
    assert rig.states() == [(1, G.DRAINING), (2, G.DRAINING)]
    assert rig.procs.kills == [(old[0], TERM), (old[1], TERM), (new[0], TERM), (new[1], TERM)]
    assert "graceful stop: draining every generation" in messages(caplog)
    rig.step(HUP, at=T0 + 3.5)                     # ignored while stopping
    assert len(rig.procs.spawns) == 4
    assert "received SIGHUP while stopping: ignored" in messages(caplog)
    for pid in old + new[:1]:
        rig.procs.exit(pid, code=0)
    rig.step(at=T0 + 4)
    assert rig.states() == [(2, G.DRAINING)]
    rig.step(at=T0 + 8)                            # drain deadline of the straggler
    assert rig.procs.kills[4:] == [(new[1], KILL)]
    rig.procs.exit(new[1], signal=9)
    rig.step(at=T0 + 8.5)
    assert m.generations == []
    assert m.system.listeners.keys() == set()
    assert m.exit_code == 0


def test_quit_is_a_graceful_stop(rig: Rig) -> None:
    m = rig.serving(count=2)
    rig.step(QUIT, at=T0 + 1)
    assert rig.states() == [(1, G.DRAINING)]
    assert rig.procs.kills == [(1000, TERM), (1001, TERM)]
    for pid in rig.procs.pids(1):
        rig.procs.exit(pid, code=0)
    rig.step(at=T0 + 2)
    assert m.generations == [] and m.exit_code == 0


def test_term_while_first_generation_starts_exits_0(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    m = rig.start(count=1)
    rig.step(TERM, at=T0 + 1)
    assert rig.states() == [(1, G.DRAINING)]
    rig.procs.exit(1000, code=0)
    rig.step(at=T0 + 2)
    assert m.generations == []
    assert not any("first generation failed" in msg for msg in messages(caplog))
    assert m.exit_code == 0


def test_term_during_a_reload_is_not_a_failed_reload(rig: Rig) -> None:
    m = rig.serving(count=1)
    rig.step(HUP, at=T0 + 1)
    rig.step(TERM, at=T0 + 2)
    assert rig.states() == [(1, G.DRAINING), (2, G.DRAINING)]
    assert m.stats.reloads == {"success": 0, "failed": 0, "rejected": 0}
    assert m.stats.last_reload_ok is True


def test_int_sends_sigint_then_sigkill_after_the_grace(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    m = rig.start(count=2)
    old = rig.procs.pids(1)
    rig.ready(*old)
    rig.step(HUP, at=T0 + 1)
    new = rig.procs.pids(2)
    rig.step(INT, at=T0 + 2)
    assert rig.states() == [(1, G.DRAINING), (2, G.DRAINING)]
    assert rig.procs.kills == [(p, INT) for p in old + new]
    assert f"fast stop: SIGKILL in {FAST_STOP_GRACE:g}s" in messages(caplog)
    rig.procs.exit(old[0], signal=2)
    rig.step(INT, at=T0 + 2.5)                     # a second INT changes nothing
    rig.step(at=T0 + 2 + FAST_STOP_GRACE - 0.001)
    assert rig.procs.kills == [(p, INT) for p in old + new]
    rig.step(at=T0 + 2 + FAST_STOP_GRACE)
    rig.step(at=T0 + 10)
    assert rig.procs.kills[4:] == [(old[1], KILL), (new[0], KILL), (new[1], KILL)]
    for pid in (old[1], *new):
        rig.procs.exit(pid, signal=9)
    rig.step(at=T0 + 10.5)
    assert m.generations == []
    assert m.stats.worker_exits == {"clean": 0, "error": 0, "signal": 4}


def test_int_reports_the_sigkill_deadline(rig: Rig) -> None:
    m = rig.serving(count=1)
    rig.step(INT, at=T0 + 2)
    assert m.generations[0].next_deadline() == T0 + 2 + FAST_STOP_GRACE


def test_int_with_every_slot_in_backoff_still_stops(rig: Rig) -> None:
    m = rig.serving(count=1, restart={"backoff": 5})
    rig.procs.exit(1000, code=1)
    rig.step(at=T0 + 1)
    assert m.generations[0].workers[0].state is W.BACKOFF
    rig.step(INT, at=T0 + 2)
    rig.step(at=T0 + 10)
    assert m.generations == []


# -- TTIN / TTOU and the sockets they open and close --

def test_ttin_is_not_a_restart_and_opens_only_the_new_slot_socket(rig: Rig) -> None:
    m = rig.serving(count=3)
    retiring = m.generations[0].workers[2].pid
    rig.step(signal.SIGTTOU, at=T0 + 1)            # slot 2 retires, its worker still draining
    # Steered away from, its socket is parked (open, sent nothing new) while its worker drains.
    assert {k[3] for k in m.system.listeners.keys()} == {0, 1, 2}
    rig.step(signal.SIGTTIN, at=T0 + 2)            # a new slot 3; slot 2 must not serve again
    assert {k[3] for k in m.system.listeners.keys()} == {0, 1, 2, 3}
    assert rig.procs.spawns[-1].slot == 3
    rig.procs.exit(retiring, code=0)
    rig.step(at=T0 + 3)                            # its worker is gone: now it closes
    assert {k[3] for k in m.system.listeners.keys()} == {0, 1, 3}
    assert m.stats.worker_restarts == 0
    # Closed only once nothing could reach it: nothing queued there is at risk.
    assert m.stats.slot_retire_risks == 0


def test_failed_growing_reload_parks_its_new_slot_sockets_and_risks_nothing(rig: Rig) -> None:
    m = rig.serving(count=2)
    rig.write(count=4)
    rig.step(signal.SIGHUP, at=T0 + 1)
    assert {k[3] for k in m.system.listeners.keys()} == {0, 1, 2, 3}
    new = rig.procs.pids(2)
    rig.procs.exit(new[0], code=3)
    rig.step(at=T0 + 2)
    assert m.stats.reloads["failed"] == 1
    # Steering never sent the failed generation's extra slots a connection; they stay
    # open (parked) until the failed workers holding them are gone, then close.
    assert {k[3] for k in m.system.listeners.keys()} == {0, 1, 2, 3}
    for pid in new[1:]:
        rig.procs.exit(pid, signal=signal.SIGTERM)
    rig.step(at=T0 + 3)
    assert {k[3] for k in m.system.listeners.keys()} == {0, 1}
    assert m.stats.slot_retire_risks == 0


def _migrate_req_on_host() -> int:
    """Read net.ipv4.tcp_migrate_req straight from /proc (not through the code under test)."""
    return int(Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text())


def test_usr1_asks_the_subscribers_to_reopen_the_log(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    from upgraderd.core import events as ev
    m = rig.serving()
    asked: list[ev.LogReopenAsked] = []
    m.bus.subscribe(ev.LogReopenAsked, asked.append)
    rig.step(signal.SIGUSR1, at=T0 + 1)
    assert asked == [ev.LogReopenAsked()]
    assert "reopened the log file (SIGUSR1)" in caplog.messages
    assert rig.states() == [(1, G.ACTIVE)]
