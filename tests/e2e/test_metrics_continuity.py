"""Counters never reset: 50 reloads and a worker crash every 10, scraped all along.

Each dead worker's counts go to the master's archive, and every reload and
crash is a chance for a series to drop. The suite runs 50 reloads and 5
crashes (it ran 200 and 8, four times as long); longer runs belong to
bench/soak.py. How full the archive may get is tested in
tests/unit/test_metric_files_untrusted.py.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest

from tests.support.loadgen import Load
from tests.support.scrape import Key, scrape, value
from tests.support.upgraderd_proc import Daemon, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e

RELOADS = 50
CRASH_EVERY = 10
# Per live worker: one counter file and one livesum gauge file (the archive is in the master's memory).
FILES_PER_WORKER = 2


def monotonic_keys(samples: dict[Key, float]) -> dict[Key, float]:
    """Return the samples Prometheus treats as counters (a drop would read as a reset)."""
    return {k: v for k, v in samples.items()
            if k[0].endswith(("_total", "_count", "_sum", "_bucket")) and not k[0].startswith("python_gc")}


def generation_of(pid: int) -> int:
    """Return the generation a worker belongs to (from its environment); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(x.partition(b"=")[::2] for x in f.read().split(b"\0") if x)
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return int(env.get(b"UPGRADERD_GENERATION", b"0"))


class Scraper:
    """Scrape in a background thread, recording counters and the metric file count."""

    def __init__(self, cfg: dict[str, object], mp_dir: str) -> None:
        self.cfg, self.mp_dir = cfg, mp_dir
        self.scrapes: list[dict[Key, float]] = []
        self.file_counts: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.scrapes.append(monotonic_keys(scrape(self.cfg)))
                self.file_counts.append(len(os.listdir(self.mp_dir)))
            except Exception as e:  # noted and asserted on by the test
                self.errors.append(repr(e))
            self._stop.wait(0.05)  # the scrape rate, not a wait for a condition

    def start(self) -> Scraper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def test_counters_are_monotonic_over_50_reloads_and_crashes(tmp_path):
    port, mp = free_port(), tmp_path / "mp"
    cfg = echo_config(port, count=1, metrics={"listen": f"127.0.0.1:{free_port()}", "dir": str(mp)})
    with Daemon(tmp_path, cfg).start() as d:
        scraper = Scraper(cfg, str(mp)).start()
        started = time.monotonic()
        load = Load("127.0.0.1", port, threads=2, max_seconds=240).start("echo")
        assert load.wait_for_ok(50)
        crashes = 0
        for n in range(2, RELOADS + 2):
            if n % CRASH_EVERY == 0:
                (victim,) = [p for p in d.workers() if generation_of(p) == n - 1]
                os.kill(victim, signal.SIGKILL)
                crashes += 1
                d.wait_log(rf"generation {n - 1} slot 0: respawning(?:\n|$)")
            d.send(signal.SIGHUP)
            d.wait_log(rf"reload done: generation {n} ACTIVE", timeout=30)
        final = RELOADS + 1
        wait_until(lambda: f"generation {final - 1} DRAINING -> RETIRED" in d.log(), 20, "the last drain")
        result = load.stop()
        elapsed = time.monotonic() - started
        scraper.stop()
        last = scrape(cfg)
        (live,) = [p for p in d.workers() if generation_of(p) == final]
        files = sorted(os.listdir(mp))

    assert scraper.errors == []
    assert len(scraper.scrapes) >= 100, len(scraper.scrapes)
    scrapes = [*scraper.scrapes, monotonic_keys(last)]
    for i, (before, after) in enumerate(zip(scrapes, scrapes[1:])):
        gone = set(before) - set(after)
        assert not gone, f"scrape {i + 1}: series disappeared: {sorted(gone)[:5]}"
        down = {k: (before[k], after[k]) for k in before if after[k] < before[k]}
        assert not down, f"scrape {i + 1}: counters went down: {down}"

    assert value(last, "upgraderd_reloads_total", result="success") == RELOADS
    assert value(last, "upgraderd_generation") == final
    assert value(last, "upgraderd_worker_restarts_total") == crashes
    # Every worker but the live one exited once: one per old generation, one per crash. (A
    # respawned worker drained before it installed its handlers dies of SIGTERM, hence >=.)
    exits = {r: value(last, "upgraderd_worker_exits_total", reason=r) for r in ("clean", "error", "signal")}
    assert sum(exits.values()) == RELOADS + crashes, exits
    assert exits["signal"] >= crashes and exits["error"] == 0, exits
    # Each crash can cost the client the round trips in flight on the killed worker.
    assert set(result.failures) <= {"reset", "short"}, result.failures
    assert sum(result.failures.values()) <= 2 * crashes, result.failures
    accepted = value(last, "upgraderd_connections_accepted_total", listener="echo")
    # A SIGKILLed worker loses the counts it made since its last flush: while busy, flushes are
    # HOUSEKEEPING (20 ms) apart, give or take a loop pass. Allowed here: 100 ms of the load's
    # mean rate per crash, plus the round trips in flight (one per client thread).
    lost_at_most = crashes * (2 + math.ceil(result.ok / elapsed * 0.1))
    assert result.ok - lost_at_most <= accepted <= result.ok + sum(result.failures.values())

    # 100+ workers came and went; the directory holds only the live worker's files.
    print(f"\n{RELOADS} reloads, {crashes} crashes, {len(scrapes)} scrapes, {result.ok} round trips, "
          f"metric files max {max(scraper.file_counts)}")
    assert files == sorted([f"counter_{live}.db", f"gauge_livesum_{live}.db"]), files
    assert max(scraper.file_counts) <= FILES_PER_WORKER * 4, max(scraper.file_counts)
