"""Flow control on a template's channel: queue what it cannot take yet, give up only on a stall."""

from __future__ import annotations

import pytest

from tests.support.fakes import FakeNotify, FakeProcessAPI, FakeTemplates, fake_system
from tests.support.upgraderd_proc import free_port
from upgraderd.core.generation import GenerationState
from upgraderd.core.master import assemble
from upgraderd.core.seams import Exit
from upgraderd.core.prefork import STALL

COUNT = 7
ROOM = 3   # requests the fake channel holds before it is full


@pytest.fixture
def rig(tmp_path):
    path = tmp_path / "u.yaml"
    path.write_text(f"""\
listeners:
  - {{name: web, port: {free_port()}}}
workers: {{count: {COUNT}, app: echo, prefork: true}}
ready: {{timeout: 60s}}
kernel: {{tcp_migrate_req: ignore}}
""")
    procs, note, clock = FakeProcessAPI(), FakeNotify(), [100.0]
    system = fake_system(procs, note)
    system.templates = tpl = FakeTemplates(procs, room=ROOM)
    m = assemble(str(path), system, clock=lambda: clock[0])
    m.start()
    yield m, procs, note, tpl, clock
    system.listeners.close_all()
    system.probes.close()


def slots(tpl: FakeTemplates) -> list[int]:
    return [slot for _t, slot, _env, _fds in tpl.forks]


def test_a_full_channel_queues_the_rest_and_sends_it_as_the_template_reads(rig):
    m, procs, note, tpl, clock = rig
    (template,) = procs.pids()
    gen = m.starting
    assert gen.state is GenerationState.STARTING and slots(tpl) == [0, 1, 2]
    assert [s for _t, s, _e, _f in tpl.queued[template]] == [3, 4, 5, 6]
    assert tpl.writers() == [template]
    for taken, want in ((2, [0, 1, 2, 3, 4]), (5, [0, 1, 2, 3, 4, 5, 6])):
        tpl.read(taken)
        clock[0] += 1.0
        m.step(set())   # the loop woke: the channel became writable
        assert slots(tpl) == want
    assert tpl.queued == {} and tpl.writers() == []
    for slot in range(COUNT):
        note.send(template, f"SPAWNED={slot}:{5000 + slot}".encode())
    note.ready(*range(5000, 5000 + COUNT))
    m.step(set())
    assert gen.state is GenerationState.ACTIVE and m.stats.reloads["failed"] == 0
    assert tpl.stopped == []


def test_a_template_that_takes_nothing_fails_its_generation_after_the_stall_deadline(rig):
    m, procs, note, tpl, clock = rig
    (template,) = procs.pids()
    gen = m.starting
    m.step(set())                     # the first pass that finds the queue starts the clock
    assert m.timeout(clock[0]) == pytest.approx(1.0)   # the select timeout is capped at 1s
    assert min(m.fleet.prefork.deadlines(m.generations)) == pytest.approx(clock[0] + STALL)
    clock[0] += STALL - 0.5
    tpl.read(1)                       # progress, however slow, restarts the deadline
    m.step(set())
    assert slots(tpl) == [0, 1, 2, 3] and gen.state is GenerationState.STARTING
    clock[0] += STALL - 0.5
    m.step(set())
    assert gen.state is GenerationState.STARTING and tpl.stopped == []
    clock[0] += 0.5
    m.step(set())
    assert gen.state is GenerationState.RETIRED   # FAILED, and no worker was forked
    assert gen.reason == f"template pid {template} took no request for {STALL:g}s (queue full)"
    assert tpl.stopped == [template] and tpl.queued == {}
    assert m.fleet.prefork.deadlines(m.generations) == []


def test_a_stalled_template_of_the_active_generation_only_stops_respawns(rig):
    m, procs, note, tpl, clock = rig
    (template,) = procs.pids()
    tpl.read(COUNT)
    m.step(set())
    for slot in range(COUNT):
        note.send(template, f"SPAWNED={slot}:{5000 + slot}".encode())
    note.ready(*range(5000, 5000 + COUNT))
    m.step(set())
    gen = m.active
    assert gen is not None and gen.number == 1
    tpl.room = 0                      # from now on the template reads nothing
    procs._pending.append(Exit(5000, signal=9))   # a forked worker: not a spawn of ours
    m.step(set())
    clock[0] += 0.2
    m.step(set())                     # the respawn's request waits: the channel is full
    assert tpl.queued[template][0][1] == 0 and gen.state is GenerationState.ACTIVE
    m.step(set())                     # the next pass (at most 1s later) starts the clock
    clock[0] += STALL
    m.step(set())
    assert gen.state is GenerationState.ACTIVE and tpl.stopped == [template]
    assert sorted(gen.pids()) == list(range(5001, 5000 + COUNT))
