"""Counters across a USR2 re-exec of the master: the new master counts on from the old one's figures.

The exec itself is a fake (it records the hand-over record instead of exec'ing);
a second master is then built over fresh fakes from that record, as the exec'd
process would be, and must carry every counter on.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path
from tests.support.fakes import FakeClock, FakeExec, FakeNotify, FakeProcessAPI, fake_system
from tests.support.upgraderd_proc import free_port
from tests.support.fakes import FakeTemplates
from upgraderd.core import events as ev
from upgraderd.core.generation import GenerationState
from upgraderd.core.handover import Handover
from upgraderd.core.master import Master, assemble
from upgraderd.core.stats import Stats, counters

T0 = 100.0


def _prefork_config(path: Path) -> None:
    path.write_text(f"""\
listeners:
  - {{name: web, host: 127.0.0.1, port: {free_port()}}}
workers: {{count: 1, app: echo, prefork: true}}
kernel: {{tcp_migrate_req: ignore}}
""")


def _reexec(m: Master, procs: FakeProcessAPI, execs: FakeExec) -> Handover:
    """Send USR2, pass the preflight, and return the record the exec was given."""
    m.step({signal.SIGUSR2})
    procs.exit(procs.spawns[-1].pid, code=0)
    m.step(set())
    (record,) = execs.records
    return _as_execd(record)


def _as_execd(record: Handover) -> Handover:
    """Return `record` with its listeners' fds duplicated (the only real fds in it: the notify
    socket is a fake). An exec keeps the old master's open files under the same numbers, and
    the old master is gone. Here it lives on in this process (the fake exec fails, like a
    broken one), so the new master must own copies: two socket objects on one fd number close
    it twice when they are collected, and the second close hits whatever file has that number
    by then (another test's: a metric file test failed with EBADF that way)."""
    assert record.fds == {}, "a real fd in the record: duplicate it too"
    return dataclasses.replace(record, listeners=[{**e, "fd": os.dup(int(str(e["fd"])))} for e in record.listeners])


def test_templates_started_counts_on_after_a_reexec(tmp_path: Path) -> None:
    path = tmp_path / "u.yaml"
    _prefork_config(path)
    clock, procs, note = FakeClock(T0), FakeProcessAPI(), FakeNotify()
    execs = FakeExec()
    system = fake_system(procs, note, execs=execs)
    system.templates = FakeTemplates(procs)
    old = assemble(str(path), system, clock=clock)
    old.start()
    (template,) = procs.pids()
    note.send(template, b"SPAWNED=0:5000")
    note.ready(5000)
    old.step(set())
    assert old.stats.templates_started == {"cold": 1, "warm": 0}
    record = _reexec(old, procs, execs)

    # The exec'd master: same process, fresh seams, the old master's record.
    system2 = fake_system(procs, note)
    system2.templates = FakeTemplates(procs)
    new = assemble(str(path), system2, clock=clock, handover=record)
    new.start()
    new.step(set())                        # the adopted master rolls a new generation, as on HUP
    assert [(g.number, g.state) for g in new.generations] == \
        [(1, GenerationState.ACTIVE), (2, GenerationState.STARTING)]
    assert new.stats.templates_started == {"cold": 2, "warm": 0}


def _total(stats: Stats, attr: str) -> int:
    value = getattr(stats, attr)
    return sum(value.values()) if isinstance(value, dict) else int(value)


def test_every_declared_counter_counts_on_after_a_reexec(tmp_path: Path) -> None:
    """Walk the declarations of core/stats.py: a new counter is covered here without being listed."""
    path = tmp_path / "u.yaml"
    path.write_text(f"""\
listeners:
  - {{name: web, host: 127.0.0.1, port: {free_port()}}}
workers: {{count: 1, app: echo}}
kernel: {{tcp_migrate_req: ignore}}
""")
    clock, procs, note, execs = FakeClock(T0), FakeProcessAPI(), FakeNotify(), FakeExec()
    old_bus = ev.Bus()
    old = assemble(str(path), fake_system(procs, note, execs=execs), clock=clock, bus=old_bus)
    old.start()
    note.ready(*procs.pids())
    old.step(set())
    declared = list(counters())
    assert declared, "core/stats.py declares no counter"
    # Give every counter a non-zero figure in the old master, so carrying on is visible.
    subscribed = old.tally.subscribed
    for spec in declared:
        assert subscribed.get(spec.attr), f"counter {spec.metric} counts no event (core/stats.py Tally)"
        for kind in subscribed[spec.attr]:
            old_bus.emit(kind())
    before = {spec.attr: _total(old.stats, spec.attr) for spec in declared}
    record = _reexec(old, procs, execs)

    bus = ev.Bus()
    new = assemble(str(path), fake_system(procs, note), clock=clock, bus=bus, handover=record)
    new.start()
    new.step(set())
    carried = {spec.attr: _total(new.stats, spec.attr) for spec in declared}
    assert {a: carried[a] >= n > 0 for a, n in before.items()} == {a: True for a in before}
    for spec in declared:
        for kind in new.tally.subscribed[spec.attr]:
            was = _total(new.stats, spec.attr)
            bus.emit(kind())
            new.step(set())
            published = new.publisher.published
            assert published is not None
            assert (spec.metric, _total(published.stats, spec.attr)) == (spec.metric, was + 1)
