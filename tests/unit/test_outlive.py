"""Orphans, the takeover decision, passed-socket names, status-file validation, /proc parsing: no real processes."""

from __future__ import annotations

import ipaddress
import signal
from pathlib import Path

import pytest
import yaml

from tests.support.fakes import FakeClock, FakeNotify, FakeProcessAPI, fake_system
from tests.support.upgraderd_proc import free_port
from upgraderd.config import schema
from upgraderd.core.generation import GenerationState as G
from upgraderd.core.events import Bus
from upgraderd.core.takeover import Takeover
from upgraderd.core.master import Master, assemble
from upgraderd.errors import ConfigError
from upgraderd.system import activation, conflict, orphanfds
from upgraderd.worker.outlive import OrphanWatch, grace_from_env


class FakeOrphans:
    """OrphanAPI: pids that exit when told to."""

    def __init__(self, pids: list[int]) -> None:
        self.alive = list(pids)
        self.signals: list[str] = []
        self.closed = False

    def live(self) -> int:
        return len(self.alive)

    def pids(self) -> list[int]:
        return list(self.alive)

    def drain(self) -> None:
        self.signals.append("drain")

    def kill(self) -> None:
        self.signals.append("kill")

    def close(self) -> None:
        self.closed = True


def _master(tmp_path: Path, found: FakeOrphans, clock: FakeClock) -> tuple[Master, FakeNotify]:
    path = tmp_path / "upgraderd.yaml"
    path.write_text(yaml.safe_dump({
        "listeners": [{"name": "main", "port": free_port()}], "workers": {"count": 1, "app": "echo"},
        "drain": {"timeout": "5s"}}))
    notify = FakeNotify()
    procs = FakeProcessAPI()
    bus = Bus()
    master = assemble(str(path), fake_system(procs, notify), clock=clock, bus=bus, takeover=Takeover(found, bus))
    return master, notify


def test_orphans_are_drained_only_once_the_first_generation_is_active_then_killed_at_the_deadline(tmp_path):
    clock, found = FakeClock(100.0), FakeOrphans([4001, 4002])
    master, notify = _master(tmp_path, found, clock)
    master.start()
    master.step(set())
    assert found.signals == []                       # STARTING: the orphans still serve alone
    notify.ready(*master.generations[0].pids())
    master.step(set())
    assert master.generations[0].state is G.ACTIVE
    assert found.signals == ["drain"]
    assert master.stats.orphans_taken_over == 2
    clock.advance(4.9)
    master.step(set())
    assert found.signals == ["drain"]
    clock.advance(0.2)                               # drain.timeout (5s) is over
    master.step(set())
    assert found.signals == ["drain", "kill"]
    found.alive.clear()
    master.step(set())
    assert found.closed and found.signals == ["drain", "kill"]


def test_orphans_are_drained_when_the_master_stops_before_it_serves(tmp_path):
    clock, found = FakeClock(100.0), FakeOrphans([4001])
    master, _ = _master(tmp_path, found, clock)
    master.start()
    master.step({signal.SIGTERM})
    assert found.signals == ["drain"]


def test_an_orphan_serves_on_until_its_grace_period_ends():
    clock, parent = FakeClock(0.0), [77]
    watch = OrphanWatch(grace=30.0, clock=clock, getppid=lambda: parent[0])
    assert not watch.should_drain()
    parent[0] = 1                                    # the master died: reparented to init
    clock.advance(10)
    assert not watch.should_drain()                  # the grace period starts when we notice
    clock.advance(29.9)
    assert not watch.should_drain()
    clock.advance(0.2)
    assert watch.should_drain()


@pytest.mark.parametrize("raw, expected", [("12.5", 12.5), ("0", 0.0), ("", 30.0), ("nan", 30.0),
                                           ("-1", 30.0), ("inf", 30.0), ("x", 30.0)])
def test_the_grace_period_from_the_environment_falls_back_to_the_default(raw, expected):
    assert grace_from_env({"UPGRADERD_ORPHAN_GRACE": raw}) == expected


def test_drain_orphan_grace_is_validated_with_its_location(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("listeners: [{name: a, port: 8080}]\nworkers: {app: echo}\ndrain:\n  orphan_grace: 2h\n")
    with pytest.raises(ConfigError) as e:
        schema.load(str(path))
    assert f"{path}:4:" in str(e.value) and "drain.orphan_grace" in str(e.value) and "longer than 1h" in str(e.value)
    path.write_text("listeners: [{name: a, port: 8080}]\nworkers: {app: echo}\ndrain: {orphan_grace: 500ms}\n")
    assert schema.load(str(path)).drain.orphan_grace == 0.5


@pytest.mark.parametrize("name, expected", [("web", ("web", None)), ("web/3", ("web", 3)),
                                            ("web/x", ("web/x", None)), ("/3", ("/3", None)),
                                            ("web/\u00b2", ("web/\u00b2", None)), ("web/99999", ("web/99999", None))])
def test_passed_socket_names_carry_the_slot(name, expected):
    assert activation.parse_name(name) == expected


@pytest.mark.parametrize("doc, expected", [
    ({"pid": 500, "generations": [{"workers": [{"pid": 501, "slot": 0}, {"pid": 502, "slot": 1}]},
                                  {"workers": [{"pid": 501, "slot": 1}]}]},
     (500, {501: 0, 502: 1})),
    # A slot that is not a small non-negative int is not recorded (the pid still is).
    ({"pid": 500, "generations": [{"workers": [{"pid": 501, "slot": "1"}, {"pid": 502, "slot": -1},
                                               {"pid": 503, "slot": 1 << 40}, {"pid": 504}]}]},
     (500, {501: None, 502: None, 503: None, 504: None})),
    ({"pid": True, "generations": []}, (0, {})),
    ({"pid": 500, "generations": "x"}, (0, {})),
    ({"pid": 500, "generations": [{"workers": [{"pid": -1}, {"pid": 1}, {"pid": "7"}, {"pid": 1 << 40},
                                               {"pid": False}, None, {"pid": 9.5}]}, 3]}, (500, {})),
])
def test_the_status_file_only_suggests_well_formed_pids(doc, expected):
    assert orphanfds.suggested_pids(doc) == expected


def test_a_status_file_that_is_a_symlink_is_not_read(tmp_path):
    real = tmp_path / "real.json"
    real.write_text('{"pid": 500, "generations": []}')
    link = tmp_path / "upgraderd.pid.status.json"
    link.symlink_to(real)
    assert orphanfds.read_status(str(link)) is None
    assert orphanfds.read_status(str(real)) == {"pid": 500, "generations": []}
    big = tmp_path / "big.json"
    big.write_text(" " * (orphanfds.MAX_STATUS + 1) + "{}")
    assert orphanfds.read_status(str(big)) is None


@pytest.mark.parametrize("hexaddr, addr, port", [
    ("0100007F:1F90", "127.0.0.1", 8080),
    ("00000000000000000000000001000000:0050", "::1", 80),
    ("00000000:0016", "0.0.0.0", 22),
])
def test_proc_net_tcp_addresses_decode(hexaddr, addr, port):
    assert conflict._decode(hexaddr) == (ipaddress.ip_address(addr), port)


def test_a_wildcard_listener_overlaps_a_specific_one_of_its_family_only():
    a = ipaddress.ip_address
    assert conflict._overlaps(a("0.0.0.0"), a("127.0.0.1"))
    assert conflict._overlaps(a("127.0.0.1"), a("127.0.0.1"))
    assert not conflict._overlaps(a("127.0.0.1"), a("127.0.0.2"))
    assert not conflict._overlaps(a("::"), a("127.0.0.1"))
