"""Giving back: a rolled-back canary's worker gives to the older generation it served beside."""

from __future__ import annotations

import os

import pytest

from upgraderd.worker import handoff, peers

MASTER = 4_100_000 + os.getpid()   # no real process has it: the channel names stay private


def takers(monkeypatch: pytest.MonkeyPatch, *where: tuple[int, int]) -> list[handoff.Taker]:
    out = []
    for generation, slot in where:
        monkeypatch.setenv("UPGRADERD_GENERATION", str(generation))
        monkeypatch.setenv("UPGRADERD_SLOT", str(slot))
        out.append(handoff.Taker(["web"], master=MASTER, trust=lambda p: True))
    return out


@pytest.mark.parametrize("others, chosen", [
    ([(1, 0), (1, 1), (2, 1)], {1}),            # a canary (2) rolled back: its predecessor, not its sibling
    ([(1, 0), (3, 0), (3, 1)], {3}),            # a newer generation still wins over an older one
    ([(2, 1)], {2}),                            # neither: the siblings, as before
])
def test_a_giver_prefers_newer_then_the_newest_older_then_its_siblings(monkeypatch, others, chosen) -> None:
    open_ = takers(monkeypatch, *others)
    monkeypatch.setenv("UPGRADERD_GENERATION", "2")
    monkeypatch.setenv("UPGRADERD_SLOT", "0")
    giver = handoff.Giver(master=MASTER, trust=lambda p, c: True)
    try:
        assert giver.find() > 0
        assert {t.channel.generation for t in giver._targets} == chosen
    finally:
        giver.close()
        for t in open_:
            t.close()


def test_a_taker_trusts_a_giver_of_a_newer_generation_of_its_master(monkeypatch) -> None:
    monkeypatch.setenv("UPGRADERD_GENERATION", "1")
    monkeypatch.setenv("UPGRADERD_SLOT", "0")
    t = handoff.Taker(["web"], master=MASTER)   # the default check
    try:
        def peer(generation: int | None, parent: int = MASTER) -> peers.Peer:
            return peers.Peer(pid=os.getpid() + 1, uid=os.geteuid(), parent=parent, generation=generation)
        assert t.trust(peer(2)) and t.trust(peer(1))
        assert not t.trust(peer(None)) and not t.trust(peer(2, parent=MASTER + 1))
    finally:
        t.close()
