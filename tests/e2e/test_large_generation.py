"""The shipped default config (prefork, warm standby) with 128 workers: it starts and reloads.

With one request packet per worker on the template's control channel, 56 or
more workers used to fill the channel and fail generation 1 ("queue full");
the master now queues what the channel cannot take yet (system/templatectl.py).
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT
from tests.support.loadgen import Load
from tests.support.upgraderd_proc import Daemon, free_port, wait_until

pytestmark = pytest.mark.e2e

COUNT = 128


def shipped_config(count: int) -> dict[str, object]:
    """Return config/upgraderd.yaml as shipped, with `count` workers and free ports."""
    cfg = yaml.safe_load((ROOT / "config" / "upgraderd.yaml").read_text())
    cfg["workers"]["count"] = count
    cfg["listeners"][0]["port"] = free_port()
    cfg["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
    return cfg  # type: ignore[no-any-return]


def workers_of(master: int, generation: int) -> set[int]:
    """Return the master's children that are workers (comm) of `generation` (environ)."""
    found = set()
    for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue   # exited meanwhile
        if comm == "upgraderd-work" and f"UPGRADERD_GENERATION={generation}".encode() in env:
            found.add(int(pid))
    return found


def test_the_default_config_starts_and_reloads_with_128_workers(tmp_path):
    cfg = shipped_config(COUNT)
    assert cfg["workers"]["prefork"] is True and cfg["workers"]["warm"] is True
    port = cfg["listeners"][0]["port"]
    with Daemon(tmp_path, cfg) as d:
        d.start(wait=False)
        d.wait_log(r"serving: generation 1 ACTIVE", timeout=90)
        load = Load("127.0.0.1", port, threads=4, max_seconds=120).start("echo")
        try:
            assert load.wait_for_ok(50)
            for generation in (2, 3):
                d.send(signal.SIGHUP)
                d.wait_log(rf"reload done: generation {generation} ACTIVE", timeout=90)
                wait_until(lambda: len(workers_of(d.pid, generation)) == COUNT, 30,
                           f"{COUNT} workers of generation {generation}")
                wait_until(lambda: not workers_of(d.pid, generation - 1), 30,
                           f"generation {generation - 1} to retire")
            assert load.wait_for_ok(load.result.ok + 50)   # generation 3 answers
        finally:
            result = load.stop()
        assert result.failures == {}, result.examples
        assert "queue full" not in d.log() and not re.search(r"generation \d+ failed", d.log())
        assert d.stop() == 0
