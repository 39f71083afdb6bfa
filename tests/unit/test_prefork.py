"""The master's prefork decisions with fake processes and a fake template channel."""

from __future__ import annotations

import signal

import pytest

from tests.support.fakes import FakeNotify, FakeProcessAPI, FakeTemplates, fake_system
from tests.support.upgraderd_proc import free_port
from tests.unit.conftest import passes
from upgraderd.core.generation import GenerationState, WorkerState
from upgraderd.core.master import Master, assemble
from upgraderd.core.prefork import STANDBY_DELAY
from upgraderd.core.seams import Exit


@pytest.fixture
def rig(tmp_path):
    path = tmp_path / "u.yaml"
    path.write_text(f"""\
listeners:
  - {{name: web, port: {free_port()}}}
workers: {{count: 2, app: echo, prefork: true}}
restart: {{backoff: 1s}}
kernel: {{tcp_migrate_req: ignore}}
""")
    procs, note, clock = FakeProcessAPI(), FakeNotify(), [100.0]
    system = fake_system(procs, note)
    system.templates = FakeTemplates(procs)
    m = assemble(str(path), system, clock=lambda: clock[0])
    m.start()
    yield m, procs, note, system.templates, clock
    system.listeners.close_all()
    system.probes.close()


def spawned(note: FakeNotify, template: int, *pairs: tuple[int, int]) -> None:
    for slot, pid in pairs:
        note.send(template, f"SPAWNED={slot}:{pid}".encode())


def test_one_template_per_generation_forks_every_slot(rig):
    m, procs, note, tpl, _ = rig
    (template,) = procs.pids()
    assert procs.spawns[0].argv[-2:] == ("upgraderd.apps.template", "echo")
    assert "LISTEN_FDS" not in procs.spawns[0].env
    assert [(t, s, env["UPGRADERD_SLOT"], env["LISTEN_FDS"], len(fds)) for t, s, env, fds in tpl.forks] == \
        [(template, 0, "0", "1", 1), (template, 1, "1", "1", 1)]
    gen = m.starting
    assert [w.pid for w in gen.workers.values()] == [None, None]
    assert m.stats.templates_started == {"cold": 1, "warm": 0}
    # SPAWNED and the workers' READY=1 in one batch: the pids are learned first.
    spawned(note, template, (0, 5000), (1, 5001))
    note.ready(5000, 5001)
    passes(m)
    assert gen.state is GenerationState.ACTIVE and m.stats.notify_rejected == 0
    assert sorted(gen.pids()) == [5000, 5001]


def test_spawned_is_believed_only_from_the_template(rig):
    m, procs, note, _, _ = rig
    (template,) = procs.pids()
    spawned(note, template, (0, 5000))
    note.send(5000, b"SPAWNED=1:6666")   # a worker cannot claim a slot
    spawned(note, template, (1, 4242))   # nor can the template name a process not ours
    passes(m)
    assert sorted(m.starting.pids()) == [5000] and procs.kills == []


def test_an_exit_reaped_before_its_spawned_is_applied_late(rig):
    m, procs, note, _, _ = rig
    (template,) = procs.pids()
    procs._pending.append(Exit(5001, code=1))   # reaped before the master knew the pid
    passes(m)
    spawned(note, template, (0, 5000), (1, 5001))
    passes(m)
    assert m.stats.reloads["failed"] == 0 and m.stats.last_reload_error == ""
    gen = next(g for g in m.generations if g.number == 1)
    assert gen.state is GenerationState.FAILED
    assert gen.reason == "slot 1 (pid 5001) exited at start-up: exit code 1"
    assert procs.kills == [(5000, signal.SIGTERM)]


def test_a_template_that_dies_at_start_fails_only_its_generation(rig):
    m, procs, note, tpl, clock = rig
    (t1,) = procs.pids()
    spawned(note, t1, (0, 5000), (1, 5001))
    note.ready(5000, 5001)
    passes(m, {signal.SIGHUP})
    t2 = procs.pids()[-1]
    assert m.starting.number == 2 and t2 != t1
    procs.exit(t2, code=3)
    passes(m)
    assert m.stats.reloads["failed"] == 1
    assert m.stats.last_reload_error == f"generation 2: template pid {t2} exit code 3"
    assert [g.number for g in m.generations] == [1] and m.active.number == 1 and sorted(m.active.pids()) == [5000, 5001]
    assert t1 not in tpl.stopped and procs.kills_of([5000, 5001]) == []
    assert m.stats.worker_exits["error"] == 0   # a template is not a worker


def test_respawn_uses_the_live_template_and_fails_once_it_is_gone(rig):
    m, procs, note, tpl, clock = rig
    (t1,) = procs.pids()
    spawned(note, t1, (0, 5000), (1, 5001))
    note.ready(5000, 5001)
    passes(m)
    procs._pending.append(Exit(5000, signal=9))
    passes(m)
    clock[0] += 1.5
    passes(m)
    assert tpl.forks[-1][:2] == (t1, 0) and len(procs.pids()) == 1   # no new exec
    spawned(note, t1, (0, 5002))
    note.ready(5002)
    passes(m)
    assert sorted(m.active.pids()) == [5001, 5002]
    assert m.stats.worker_restarts == 1
    procs.exit(t1, signal=9)
    passes(m)
    procs._pending.append(Exit(5002, signal=9))
    passes(m)
    clock[0] += 1.5
    passes(m)
    assert len(procs.pids()) == 1   # never a new template for an old generation
    assert m.active.workers[0].state is WorkerState.BACKOFF


def test_the_old_template_stops_and_a_late_spawned_is_drained(rig):
    m, procs, note, tpl, _ = rig
    (t1,) = procs.pids()
    spawned(note, t1, (0, 5000), (1, 5001))
    note.ready(5000, 5001)
    passes(m, {signal.SIGHUP})
    t2 = procs.pids()[-1]
    spawned(note, t2, (0, 6000), (1, 6001))
    note.ready(6000, 6001)
    passes(m)
    passes(m)
    assert m.active.number == 2 and tpl.stopped == [t1]
    spawned(note, t1, (1, 5999))   # sent before it was stopped
    passes(m)
    assert (5999, signal.SIGTERM) in procs.kills


def warm_and_hup(rig, tmp_path):
    """Serve generation 1, make the config warm and HUP; return the config's path."""
    m, procs, note, _, _ = rig
    path = tmp_path / "u.yaml"
    path.write_text(path.read_text().replace("prefork: true", "prefork: true, warm: true"))
    (t1,) = procs.pids()
    spawned(note, t1, (0, 5000), (1, 5001))
    note.ready(5000, 5001)
    passes(m)
    passes(m, {signal.SIGHUP})
    return path


def test_a_warm_standby_takes_the_next_generation_only_if_it_fits(rig, tmp_path):
    m, procs, note, tpl, clock = rig
    path = warm_and_hup(rig, tmp_path)   # generation 2, warm: a fresh template (no standby yet)
    t2 = procs.pids()[-1]
    spawned(note, t2, (0, 6000), (1, 6001))
    note.ready(6000, 6001)
    passes(m)
    assert procs.pids()[-1] == t2 and m.timeout(clock[0]) == pytest.approx(STANDBY_DELAY)   # not at once
    clock[0] += STANDBY_DELAY
    passes(m)
    standby = procs.pids()[-1]
    assert procs.spawn_of(standby).argv[-1] == "--standby=+recorded" and m.active.number == 2
    # Exec'd as the generation it will serve: hand-off peers read it in /proc/PID/environ.
    assert procs.spawn_of(standby).env["UPGRADERD_GENERATION"] == "3"
    passes(m, {signal.SIGHUP})      # generation 3 takes the standby: no exec
    assert tpl.loads == [(standby, "echo")] and procs.pids()[-1] == standby
    assert m.stats.templates_started == {"cold": 2, "warm": 1}
    assert [f[:2] for f in tpl.forks[-2:]] == [(standby, 0), (standby, 1)]
    spawned(note, standby, (0, 7000), (1, 7001))
    note.ready(7000, 7001)
    passes(m)
    clock[0] += STANDBY_DELAY
    passes(m)
    second = procs.pids()[-1]
    assert procs.spawn_of(second).argv[-1] == "--standby=+recorded"
    assert procs.spawn_of(second).env["UPGRADERD_GENERATION"] == "4"
    # A changed worker environment: the standby's interpreter does not fit; a fresh exec.
    path.write_text(path.read_text().replace("warm: true", "warm: true, env: {A: b}"))
    passes(m, {signal.SIGHUP})
    assert second in tpl.stopped and tpl.loads == [(standby, "echo")]
    assert procs.spawn_of(procs.pids()[-1]).argv[-1] == "echo"


def test_the_next_standby_starts_while_the_new_generation_is_still_starting(rig, tmp_path):
    """HUPs a second apart: the standby for the generation after starts once the new template
    has forked every slot, not once its workers are ready, so a quick series of reloads finds
    every standby warm."""
    m, procs, note, tpl, clock = rig
    path = warm_and_hup(rig, tmp_path)        # generation 2: a fresh template, nothing forked yet
    t2 = procs.pids()[-1]
    clock[0] += 1.0
    passes(m)
    assert procs.pids()[-1] == t2 and m.timeout(clock[0]) == pytest.approx(1.0)   # no standby due
    spawned(note, t2, (0, 6000))
    passes(m)
    clock[0] += 1.0
    passes(m)
    assert procs.pids()[-1] == t2             # slot 1 not forked yet: the template is still busy
    spawned(note, t2, (1, 6001))
    passes(m)
    assert m.starting is not None and m.starting.number == 2
    assert m.timeout(clock[0]) == pytest.approx(STANDBY_DELAY)
    clock[0] += STANDBY_DELAY
    passes(m)
    standby = procs.pids()[-1]
    assert procs.spawn_of(standby).argv[-1] == "--standby=+recorded"
    assert procs.spawn_of(standby).env["UPGRADERD_GENERATION"] == "3"
    assert m.starting is not None and m.starting.number == 2     # generation 2's workers are not ready yet
    note.ready(6000, 6001)
    passes(m)
    assert m.active.number == 2 and procs.pids()[-1] == standby  # ACTIVE starts no second standby
    passes(m, {signal.SIGHUP})                   # generation 3 takes it
    assert tpl.loads == [(standby, "echo")] and m.stats.templates_started == {"cold": 2, "warm": 1}
    spawned(note, standby, (0, 7000), (1, 7001))
    passes(m)
    clock[0] += STANDBY_DELAY
    passes(m)
    fourth = procs.pids()[-1]
    assert procs.spawn_of(fourth).env["UPGRADERD_GENERATION"] == "4"
    note.ready(7000, 7001)
    passes(m)
    assert m.active.number == 3
    path.write_text(path.read_text().replace("warm: true", "warm: true, env: {A: b}"))
    passes(m, {signal.SIGHUP})                   # generation 4 with a new env: the standby does not fit
    assert fourth in tpl.stopped and procs.spawn_of(procs.pids()[-1]).argv[-1] == "echo"
