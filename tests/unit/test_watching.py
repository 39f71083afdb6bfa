"""Reload on file change, decided by core/watching.py: a fake clock, scripted events, real files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.fakes import FakeClock, FakeNotify, FakeProcessAPI, FakeWatcher, fake_system
from tests.support.upgraderd_proc import free_port
from tests.unit.conftest import RigMaker
from upgraderd.core.generation import GenerationState as G
from upgraderd.core.master import Master, assemble

T0 = 100.0
DEBOUNCE = 0.5


class Rig:
    """A serving Master whose config watches itself (and `extra`), with a fake watcher."""

    def __init__(self, tmp_path: Path, inotify: bool = True) -> None:
        self.path = tmp_path / "upgraderd.yaml"
        self.extra = tmp_path / "current"
        self.port = free_port()
        self.clock = FakeClock(T0)
        self.procs = FakeProcessAPI()
        self.notify = FakeNotify()
        self.watcher = FakeWatcher(inotify)
        self.master = assemble(str(self.path), fake_system(self.procs, self.notify, self.watcher), clock=self.clock)

    def write(self, env: str = "a", watch: list[str] | None = None, raw: str | None = None) -> None:
        doc: dict[str, Any] = {
            "listeners": [{"name": "main", "host": "127.0.0.1", "port": self.port}],
            "workers": {"count": 1, "app": "echo", "env": {"V": env}},
            "reload": {"watch": watch if watch is not None else ["config"], "debounce": f"{DEBOUNCE}s"},
        }
        self.path.write_text(raw if raw is not None else yaml.safe_dump(doc, sort_keys=False))

    def serve(self, **kw: Any) -> None:
        self.write(**kw)
        self.master.start()
        self.step()
        self.notify.ready(*self.procs.pids(1))
        self.step()
        assert self.states() == [(1, G.ACTIVE)]

    def step(self, at: float | None = None) -> None:
        if at is not None:
            self.clock.set(at)
        self.master.step(set())

    def edit(self, at: float, **kw: Any) -> None:
        """Write the config and deliver its inotify event at `at`."""
        self.write(**kw)
        self.watcher.event()
        self.step(at)

    def states(self) -> list[tuple[int, G]]:
        return [(g.number, g.state) for g in self.master.generations]

    def created(self) -> int:
        """Return how many generations the master has started."""
        return self.master.fleet.next_number - 1

    def triggers(self) -> int:
        return self.master.stats.watch_triggers


@pytest.fixture
def rig(rigs: RigMaker[Rig]) -> Rig:
    return rigs(Rig)


def test_a_change_reloads_once_the_debounce_has_passed_and_the_select_timeout_says_when(rig: Rig) -> None:
    rig.serve()
    assert rig.watcher.watched == [str(rig.path)]
    rig.edit(at=T0 + 1, env="b")
    assert rig.master.reloads.files.deadline == T0 + 1 + DEBOUNCE
    assert rig.master.timeout(T0 + 1) == pytest.approx(DEBOUNCE)
    rig.step(at=T0 + 1 + DEBOUNCE - 0.01)
    assert rig.states() == [(1, G.ACTIVE)] and rig.triggers() == 0
    rig.step(at=T0 + 1 + DEBOUNCE)
    assert rig.states() == [(1, G.ACTIVE), (2, G.STARTING)]
    assert rig.triggers() == 1 and rig.master.reloads.files.deadline is None
    rig.notify.ready(*rig.procs.pids(2))
    rig.step()
    assert rig.master.stats.reloads == {"success": 1, "failed": 0, "rejected": 0}
    assert rig.master.stats.last_reload_generation == 2


def test_edits_within_the_debounce_window_coalesce(rig: Rig) -> None:
    rig.serve()
    for i, at in enumerate((T0 + 1.0, T0 + 1.3, T0 + 1.6, T0 + 1.9)):
        rig.edit(at=at, env=f"v{i}")
        assert len(rig.states()) == 1, "each write pushes the deadline back"
    rig.step(at=T0 + 1.9 + DEBOUNCE)
    assert [n for n, _ in rig.states()] == [1, 2] and rig.triggers() == 1
    assert rig.procs.spawn_of(rig.procs.pids(2)[0]).env["V"] == "v3"


def test_an_event_that_changed_nothing_triggers_nothing(rig: Rig) -> None:
    rig.serve()
    rig.edit(at=T0 + 1)   # the same bytes written again (a touch, a no-op ConfigMap sync)
    rig.step(at=T0 + 2)
    assert rig.states() == [(1, G.ACTIVE)] and rig.triggers() == 0


def test_an_invalid_edit_is_rechecked_once_then_rejected_as_on_hup(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.serve()
    rig.edit(at=T0 + 1, raw="listeners: [{name: main, port: 0}]\nworkers: {app: echo}\n")
    rig.step(at=T0 + 1 + DEBOUNCE)
    assert rig.triggers() == 0, "the first check waits one more debounce for a writer still busy"
    rig.step(at=T0 + 1 + 2 * DEBOUNCE)
    assert rig.triggers() == 1
    assert rig.states() == [(1, G.ACTIVE)]
    assert rig.master.stats.reloads["rejected"] == 1
    assert any(f"{rig.path}:1:" in m and "listeners[0].port" in m for m in (r.getMessage() for r in caplog.records))
    rig.step(at=T0 + 10)
    assert rig.triggers() == 1 and rig.master.stats.reloads["rejected"] == 1, "the same bad file is not retried"


def test_a_partial_write_completed_within_the_recheck_reloads_once_and_rejects_nothing(rig: Rig) -> None:
    rig.serve()
    good = rig.path.read_text().replace("V: a", "V: b")
    rig.path.write_text(good[: len(good) // 2])
    rig.watcher.event()
    rig.step(at=T0 + 1)
    rig.step(at=T0 + 1 + DEBOUNCE)   # half a file: held
    rig.path.write_text(good)        # the writer finishes, its event lost in a full queue
    rig.step(at=T0 + 1 + 2 * DEBOUNCE)
    assert rig.triggers() == 1 and rig.master.stats.reloads["rejected"] == 0
    assert [n for n, _ in rig.states()] == [1, 2]


def test_a_deleted_path_is_waited_for_and_its_re_creation_reloads(rig: Rig) -> None:
    rig.serve()
    rig.path.unlink()
    rig.watcher.event()
    rig.step(at=T0 + 1)
    rig.step(at=T0 + 2)
    assert rig.triggers() == 0 and rig.states() == [(1, G.ACTIVE)]
    rig.edit(at=T0 + 3, env="back")
    rig.step(at=T0 + 4)
    assert rig.triggers() == 1 and [n for n, _ in rig.states()] == [1, 2]


def test_an_edit_followed_by_a_hup_is_one_reload(rig: Rig) -> None:
    import signal
    rig.serve()
    rig.edit(at=T0 + 1, env="b")
    rig.clock.set(T0 + 1.1)
    rig.master.step({signal.SIGHUP})
    assert [n for n, _ in rig.states()] == [1, 2]
    rig.notify.ready(*rig.procs.pids(2))
    rig.step(at=T0 + 3)
    assert rig.triggers() == 0 and rig.created() == 2


def test_the_watch_list_follows_the_config(rig: Rig) -> None:
    rig.serve()
    rig.extra.write_text("release 1")
    rig.edit(at=T0 + 1, env="b", watch=["config", str(rig.extra)])
    rig.step(at=T0 + 2)
    rig.notify.ready(*rig.procs.pids(2))
    rig.step(at=T0 + 3)
    assert rig.watcher.watched == [str(rig.path), str(rig.extra)]
    rig.extra.write_text("release 2")
    rig.watcher.event()
    rig.step(at=T0 + 4)
    rig.step(at=T0 + 5)
    assert rig.triggers() == 2 and rig.created() == 3


def test_without_inotify_the_paths_are_polled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    rig = Rig(tmp_path, inotify=False)
    try:
        rig.serve()
        due = rig.master.reloads.files.deadline
        assert due is not None and rig.master.timeout(rig.clock()) <= 1.0
        rig.write(env="b")   # no event at all
        rig.step(at=due)
        assert rig.triggers() == 1
    finally:
        rig.master.system.listeners.close_all()


@pytest.mark.parametrize(("reload", "problem"), [
    ("{watch: [srv/current]}", "reload.watch: item 0: 'srv/current' is not an absolute path"),
    ("{watch: [config, config]}", "reload.watch: item 1: 'config' is listed twice"),
    ("{watch: config}", "reload.watch: expected a list of paths, got 'config'"),
    ("{debounce: soon}", "reload.debounce: 'soon' is not a duration"),
    ("{wach: [config]}", "reload.wach: unknown key"),
])
def test_a_bad_reload_section_is_refused_at_its_location(reload: str, problem: str) -> None:
    from upgraderd.config import schema
    from upgraderd.errors import ConfigError
    text = f"listeners: [{{name: a, port: 8080}}]\nworkers: {{app: http}}\nreload: {reload}\n"
    with pytest.raises(ConfigError) as e:
        schema.parse(text, "f.yaml")
    assert str(e.value).startswith("f.yaml:3:"), str(e.value)
    assert problem in str(e.value)


def test_the_reload_section_survives_a_master_upgrade_hand_over() -> None:
    import json
    from upgraderd.config import schema
    from upgraderd.core.handover import config_from_dict, config_to_dict
    cfg = schema.parse("listeners: [{name: a, port: 8080}]\nworkers: {app: http}\n"
                       "reload: {watch: [config, /srv/app/current], debounce: 250ms}\n")
    back = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert back.reload == cfg.reload and back.reload.watch == ("config", "/srv/app/current")


def test_a_missing_watched_path_does_not_hold_up_a_config_edit(rig: Rig) -> None:
    """Issue 25: one missing path used to block every watch-triggered reload."""
    rig.serve(watch=["config", str(rig.extra)])   # `current` does not exist
    rig.edit(at=T0 + 1, env="b", watch=["config", str(rig.extra)])
    rig.step(at=T0 + 2)
    assert rig.triggers() == 1 and [n for n, _ in rig.states()] == [1, 2]
    # It appearing later is a change of its own.
    rig.extra.write_text("release 1")  # (the fake fingerprints files only)
    rig.watcher.event()
    rig.step(at=T0 + 3)
    rig.step(at=T0 + 4)
    assert rig.triggers() == 2


def test_a_symlink_loop_is_treated_as_missing_and_holds_up_nothing(rig: Rig) -> None:
    loop = rig.extra.parent / "loop"
    loop.symlink_to(rig.extra.parent / "loop2")
    (rig.extra.parent / "loop2").symlink_to(loop)
    rig.serve(watch=["config", str(loop)])
    rig.edit(at=T0 + 1, env="b", watch=["config", str(loop)])
    rig.step(at=T0 + 2)
    assert rig.triggers() == 1 and [n for n, _ in rig.states()] == [1, 2]
