"""The previous release's kept template (core/previous.py) and `upgraderd rollback` to it,
with the fake clock, fake processes and fake templates."""

from __future__ import annotations

import dataclasses
import logging
import signal
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.fakes import FakeNotify, FakeProcessAPI, FakeTemplates, fake_system
from tests.support.upgraderd_proc import free_port
from upgraderd.core.generation import GenerationState as G
from upgraderd.core.master import Master, assemble

from upgraderd.service import status

T0 = 100.0
HUP, WINCH = signal.SIGHUP, signal.SIGWINCH


class Rig:
    """A master of a prefork app over fake templates; each template and worker scripted by hand."""

    def __init__(self, tmp_path: Path, keep: str) -> None:
        self.path = tmp_path / "u.yaml"
        self.path.write_text(f"""\
listeners:
  - {{name: web, host: 127.0.0.1, port: {free_port()}}}
workers: {{count: 2, app: echo, prefork: true}}
rollout: {{keep_previous: {keep}}}
kernel: {{tcp_migrate_req: ignore}}
""")
        self.procs, self.note, self.clock = FakeProcessAPI(), FakeNotify(), [T0]
        self.system = fake_system(self.procs, self.note)
        self.system.templates = self.tpl = FakeTemplates(self.procs)
        self.master: Master = assemble(str(self.path), self.system, clock=lambda: self.clock[0])
        self.next_worker = 5000

    def step(self, *signals: signal.Signals, at: float | None = None) -> None:
        if at is not None:
            self.clock[0] = at
        self.master.step(set(signals))

    def serve(self, template: int, at: float) -> list[int]:
        """Let `template` fork the workers it was asked for, and make them ready; return their pids."""
        gen = self.master.fleet.starting
        assert gen is not None
        pids = []
        for slot in range(2):
            pids.append(self.next_worker)
            self.note.send(template, f"SPAWNED={slot}:{self.next_worker}".encode())
            self.next_worker += 1
        self.step(at=at)
        self.note.ready(*pids)
        self.step(at=at)
        assert gen.state is G.ACTIVE
        return pids

    def templates(self) -> list[int]:
        """Return the pids of the templates exec'd so far (workers are forked, never spawned)."""
        return [s.pid for s in self.procs.spawns]

    def ask(self, request: str, at: float) -> None:
        left = [request]
        self.master.reloads.seams = dataclasses.replace(self.master.reloads.seams,
                                                        requests=lambda: left.pop() if left else "")
        self.step(WINCH, at=at)

    def states(self) -> list[tuple[int, G, int]]:
        return [(g.number, g.state, g.runs) for g in self.master.generations]


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[Rig]:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    caplog.set_level(logging.INFO, logger="upgraderd")
    r = Rig(tmp_path, "10s")
    r.master.start()
    try:
        yield r
    finally:
        r.system.listeners.close_all()
        r.system.probes.close()


def released(rig: Rig) -> list[int]:
    return rig.tpl.stopped


def two_releases(rig: Rig) -> tuple[int, int]:
    """Serve generation 1, HUP, serve generation 2; return the two templates' pids."""
    (t1,) = rig.templates()
    rig.serve(t1, at=T0)
    rig.step(HUP, at=T0 + 1)
    t2 = rig.templates()[-1]
    rig.serve(t2, at=T0 + 1.1)
    rig.step(at=T0 + 1.2)
    return t1, t2


def test_a_reload_keeps_the_previous_template_and_rollback_forks_it(rig: Rig, caplog) -> None:
    t1, t2 = two_releases(rig)
    m = rig.master
    assert released(rig) == [] and m.fleet.previous.live() is not None
    assert m.fleet.previous.live().release == 1 and m.fleet.previous.live().template == t1
    assert "keeping the template of generation 1's release (pid %d, served by generation 1) for 10s: " \
           "`upgraderd rollback` forks it" % t1 in [r.getMessage() for r in caplog.records]
    execs = len(rig.templates())
    rig.ask("previous 1\n", at=T0 + 2)
    assert len(rig.templates()) == execs                      # no exec: forked from the kept template
    forks = rig.tpl.forks[-2:]
    assert [(pid, slot, env["UPGRADERD_GENERATION"]) for pid, slot, env, _fds in forks] == [(t1, 0, "3"), (t1, 1, "3")]
    rig.serve(t1, at=T0 + 2.02)
    rig.step(at=T0 + 2.03)
    assert rig.states() == [(1, G.DRAINING, 0), (2, G.DRAINING, 0), (3, G.ACTIVE, 1)]
    assert m.active is not None and m.active.number == 3 and m.active.runs == 1
    assert m.stats.last_reload_generation == 3 and m.stats.reloads["success"] == 2
    # The newer release's template is the kept one now: a second rollback returns to it.
    kept = m.fleet.previous.live()
    assert kept is not None and (kept.release, kept.template) == (2, t2) and released(rig) == []
    snap = m.snapshot(rig.clock[0])
    assert snap.serving_release == 1 and snap.previous is kept
    doc = status.document(snap)
    assert doc["previous"]["release"] == 2 and [g["runs"] for g in doc["generations"]][-1] == 1
    assert "runs generation 1's release (a rollback)" in status.render(doc)
    assert "reload done: generation 3 ACTIVE 0.020s after `upgraderd rollback` (a rollback: it runs " \
           "generation 1's release)" in [r.getMessage() for r in caplog.records]
    rig.ask("previous 2\n", at=T0 + 3)
    rig.serve(t2, at=T0 + 3.01)
    rig.step(at=T0 + 3.02)
    assert m.active.number == 4 and m.active.runs == 2
    assert m.fleet.previous.live().release == 1 and m.fleet.previous.live().template == t1


def test_the_kept_template_is_released_when_keep_previous_is_over(rig: Rig, caplog) -> None:
    t1, _t2 = two_releases(rig)
    deadline = T0 + 1.1 + 10
    assert rig.master.fleet.previous.deadline() == pytest.approx(deadline)
    assert rig.master.timeout(deadline - 0.25) == pytest.approx(0.25)
    rig.step(at=deadline - 0.01)
    assert released(rig) == []
    rig.step(at=deadline)
    assert released(rig) == [t1] and rig.master.fleet.previous.live() is None
    assert f"released the template of generation 1's release (pid {t1}): rollout.keep_previous (10s) is over; " \
           "`upgraderd rollback` has nothing to roll back to now" in [r.getMessage() for r in caplog.records]
    assert status.document(rig.master.snapshot(rig.clock[0]))["previous"] is None
    rig.ask("previous 1\n", at=deadline + 1)
    m = rig.master
    assert m.active is not None and m.active.number == 2 and m.fleet.starting is None
    assert m.stats.reloads["rejected"] == 1
    assert m.stats.last_reload_error == "upgraderd rollback: no previous release is kept (rollout.keep_previous)"


def test_a_kept_template_that_dies_leaves_nothing_to_roll_back_to(rig: Rig, caplog) -> None:
    t1, _t2 = two_releases(rig)
    rig.procs.exit(t1, code=1)
    rig.step(at=T0 + 2)
    assert rig.master.fleet.previous.live() is None
    assert rig.master.stats.reloads["failed"] == 0 and rig.master.active.number == 2
    rig.ask("previous 1", at=T0 + 3)
    assert rig.master.stats.reloads["rejected"] == 1


def test_the_next_reload_releases_the_older_kept_template(rig: Rig) -> None:
    t1, t2 = two_releases(rig)
    rig.step(HUP, at=T0 + 2)
    t3 = rig.templates()[-1]
    assert t3 not in (t1, t2)
    rig.serve(t3, at=T0 + 2.1)
    rig.step(at=T0 + 2.2)
    assert released(rig) == [t1]
    kept = rig.master.fleet.previous.live()
    assert kept is not None and (kept.release, kept.template) == (2, t2)


def test_a_graceful_stop_releases_the_kept_template(rig: Rig) -> None:
    t1, _t2 = two_releases(rig)
    rig.step(signal.SIGTERM, at=T0 + 2)
    assert t1 in released(rig) and rig.master.fleet.previous.live() is None


def test_the_template_of_a_release_that_may_be_kept_is_execd_with_a_padded_generation(rig: Rig) -> None:
    assert rig.procs.spawns[0].env["UPGRADERD_GENERATION"] == "000000001"


def test_without_keep_previous_the_template_is_stopped_and_rollback_is_refused(tmp_path: Path,
                                                                                monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    r = Rig(tmp_path, "0s")
    r.master.start()
    try:
        (t1,) = r.templates()
        assert r.procs.spawns[0].env["UPGRADERD_GENERATION"] == "1"
        r.serve(t1, at=T0)
        r.step(HUP, at=T0 + 1)
        r.serve(r.templates()[-1], at=T0 + 1.1)
        r.step(at=T0 + 1.2)
        assert r.tpl.stopped == [t1] and r.master.fleet.previous.live() is None
        r.ask("previous 1", at=T0 + 2)
        assert r.master.stats.reloads["rejected"] == 1 and r.master.active.number == 2
    finally:
        r.system.listeners.close_all()
        r.system.probes.close()


def test_rollback_while_a_reload_starts_is_refused(rig: Rig) -> None:
    two_releases(rig)
    rig.step(HUP, at=T0 + 2)
    assert rig.master.fleet.starting is not None
    rig.ask("previous 1", at=T0 + 2.1)
    m = rig.master
    assert m.stats.reloads["rejected"] == 1 and m.fleet.previous.live() is not None
    assert m.stats.last_reload_error.startswith("upgraderd rollback: a reload or the stop is under way")





def test_keep_previous_and_manual_are_refused_where_they_mean_nothing() -> None:
    from upgraderd.config import schema
    from upgraderd.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        schema.parse("listeners: [{name: web, port: 8080}]\nworkers: {command: [/bin/true], count: 2}\n"
                     "rollout: {keep_previous: 1m, rollback: manual}\n", "r.yaml")
    assert e.value.problems == [
        "r.yaml:3:26: rollout.keep_previous: only a prefork app has a template to keep (workers.app with prefork, "
        "or a module:factory or asgi:/wsgi: app); a command is exec'd anew at each start",
        "r.yaml:3:40: rollout.rollback: manual holds a failing canary for the operator; set rollout.strategy: "
        "canary",
    ]
    cfg = schema.parse("listeners: [{name: web, port: 8080}]\nworkers: {app: 'tests.fixtures.echo_worker:main', count: 2}\n"
                       "rollout: {keep_previous: 10m}\n", "r.yaml")
    assert cfg.rollout.keep_previous == 600.0 and cfg.prefork
