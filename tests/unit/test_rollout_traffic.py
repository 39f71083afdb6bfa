"""The traffic checks of a canary (core/trafficchecks.py) with the fake clock, fake processes and scripted counts.

The master is assembled with a fake metrics endpoint whose `read_requests`
answers what the test scripts per worker pid, as the workers' metric files
would (totals since each worker started). Each test serves generation 1,
starts a canary of 1 worker of 4, moves the counts and the clock, and checks
the verdict and its figures exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest

from tests.support.fakes import FakeClock, FakeExec, FakeNotify, FakeProcessAPI, fake_system
from tests.unit.test_master import HUP, T0, Rig, messages
from tests.unit.test_rollout import canary
from tests.unit.conftest import RigMaker
from upgraderd.config.schema import Config
from upgraderd.core.generation import GenerationState as G
from upgraderd.core.master import assemble
from upgraderd.core.requestcounts import GenerationCounts, RequestCounts

INF = float("inf")
HTTP = {"workers": {"count": 4, "app": "http"}}


class FakeMetrics:
    """The metrics endpoint's seam, with request counts scripted per pid."""

    def __init__(self) -> None:
        self.counts: dict[int, RequestCounts] = {}
        self.reads = 0

    def read_requests(self, pids: Sequence[int]) -> Mapping[int, RequestCounts]:
        self.reads += 1
        return {p: self.counts[p] for p in pids if p in self.counts}

    def worker_env(self, cfg: Config) -> dict[str, str]:
        return {}

    def on_reaped(self, pid: int) -> None:
        self.counts.pop(pid, None)   # folded into the archive: no longer per worker

    def check_reload(self, cfg: Config) -> None:
        pass

    def export(self) -> dict[str, object]:
        return {}

    def close(self) -> None:
        pass


class TrafficRig(Rig):
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "upgraderd.yaml"
        from tests.support.upgraderd_proc import free_port
        self.port = free_port()
        self.clock = FakeClock(T0)
        self.procs = FakeProcessAPI()
        self.notify = FakeNotify()
        self.execs = FakeExec()
        self.fake = FakeMetrics()
        self.master = assemble(str(self.path), fake_system(self.procs, self.notify, execs=self.execs),
                               clock=self.clock, metrics=lambda spec, source, clock, inherited: self.fake)

    def serve(self, pids: Sequence[int], requests: float, errors: float = 0.0,
              buckets: Sequence[tuple[float, float]] = ()) -> None:
        """Add `requests` answers (`errors` of them 5xx, durations in `buckets`) to each of `pids`."""
        for pid in pids:
            was = self.fake.counts.get(pid, RequestCounts())
            self.fake.counts[pid] = was.plus(RequestCounts(requests, errors, tuple(buckets)))


@pytest.fixture
def rig(rigs: RigMaker[TrafficRig]) -> TrafficRig:
    return rigs(TrafficRig)


def start(rig: TrafficRig, **checks: Any) -> tuple[list[int], int]:
    """Serve generation 1 (4 http workers), HUP, make a canary of 1 ready at T0+2; return (old pids, canary)."""
    rig.serving(4, **HTTP, **canary("10s", **checks))
    old = rig.procs.pids(1)
    rig.serve(old, 1000)                                     # before the canary: not part of any delta
    rig.step(HUP, at=T0 + 1)
    new = rig.procs.pids(2)[0]
    rig.serve([new], 40, 40)                                 # answered before it was ACTIVE: not judged
    rig.ready(new, at=T0 + 2)
    return old, new


def test_a_canary_over_its_max_5xx_share_rolls_back_with_both_shares(rig: TrafficRig) -> None:
    old, new = start(rig, error_ratio={"max": 0.02})
    rig.serve(old, 150)
    rig.serve([new], 99, 30)
    rig.step(at=T0 + 2.5)
    assert rig.master.stats.rollouts == {"promoted": 0, "rolled_back": 0}   # 99 < min_requests (100)
    rig.serve([new], 1105, 346)
    rig.step(at=T0 + 2.9)
    assert rig.master.stats.rollouts["rolled_back"] == 0     # read every 0.5s: the next reading is at T0+3
    rig.step(at=T0 + 3)
    m = rig.master
    assert m.stats.rollouts == {"promoted": 0, "rolled_back": 1}
    assert m.stats.rollout_check_failures["error_ratio"] == 1
    assert m.stats.last_reload_error == ("generation 2 rolled back: check error_ratio failed: 5xx 31.2% of 1,204 "
                                         "requests (max 2%, previous 0.0% of 600)")
    assert rig.states() == [(1, G.ACTIVE), (2, G.DRAINING)]   # the canary drains; 1 serves on, untouched
    assert rig.procs.kills_of(old) == []


def test_a_canary_over_vs_previous_times_the_serving_share_rolls_back(rig: TrafficRig) -> None:
    old, new = start(rig, error_ratio={"max": 0.5, "vs_previous": 2.0})
    rig.serve(old, 500, 10)                                  # 2,000 requests, 40 of them 5xx: 2%
    rig.serve([new], 400, 17)                                # 4.25% > 2 x 2%
    rig.step(at=T0 + 2.5)
    assert rig.master.stats.last_reload_error == (
        "generation 2 rolled back: check error_ratio failed: 5xx 4.2% of 400 requests, above 2x the previous "
        "2.0% of 2,000 (allowed 4.0%, max 50%)")


def test_the_previous_share_counts_as_at_least_one_in_min_requests(rig: TrafficRig) -> None:
    old, new = start(rig, error_ratio={"max": 0.5, "vs_previous": 2.0, "min_requests": 100})
    rig.serve(old, 500)                                      # 0 errors in 2,000: counted as 1%
    rig.serve([new], 200, 3)                                 # 1.5%: within 2 x 1%
    rig.step(at=T0 + 2.5)
    rig.step(at=T0 + 12)
    assert rig.master.stats.rollouts == {"promoted": 0, "rolled_back": 0}
    assert len(rig.procs.pids(2)) == 4                       # promoting: the window passed


def test_too_few_requests_are_not_judged_and_the_log_says_so(rig: TrafficRig,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    old, new = start(rig, error_ratio={"max": 0.02})
    rig.serve([new], 60, 60)                                 # every answer a 500, but only 60 of them
    rig.step(at=T0 + 2.5)
    rig.step(at=T0 + 12)
    assert rig.master.stats.rollouts == {"promoted": 0, "rolled_back": 0}
    assert len(rig.procs.pids(2)) == 4
    assert "rollout check error_ratio of generation 2 not judged: 60 request(s) in the 10s window " \
           "(min_requests: 100)" in messages(caplog)


def test_a_crashed_workers_answers_still_count(rig: TrafficRig) -> None:
    old, new = start(rig, error_ratio={"max": 0.1}, crashes=1)
    rig.serve([new], 80, 80)
    rig.step(at=T0 + 2.5)                                    # read: 80 answers, all 5xx, not judged yet
    rig.procs.exit(new, code=1)                              # its files are folded: its counts gone from reads
    rig.step(at=T0 + 2.6)
    rig.step(at=T0 + 2.8)
    respawned = rig.procs.pids(2)[1]
    rig.ready(respawned, at=T0 + 2.9)
    rig.serve([respawned], 30)                               # 110 answers, 80 of them 5xx: 72.7%
    rig.step(at=T0 + 3)
    assert rig.master.stats.last_reload_error.endswith("check error_ratio failed: 5xx 72.7% of 110 requests "
                                                       "(max 10%, previous 0.0% of 0)")


BUCKETS_10MS = ((0.005, 0.0), (0.01, 50.0), (0.025, 50.0), (INF, 0.0))     # p99 in (0.01, 0.025]
BUCKETS_3X = ((0.025, 20.0), (0.05, 30.0), (0.1, 50.0), (INF, 0.0))        # p99 in (0.05, 0.1]


def test_a_tripled_p99_rolls_back_at_the_windows_end_only(rig: TrafficRig) -> None:
    old, new = start(rig, latency_p99={"vs_previous": 1.5})
    rig.serve(old, 100, buckets=BUCKETS_10MS)
    rig.serve([new], 100, buckets=BUCKETS_3X)
    rig.step(at=T0 + 11.9)
    assert rig.master.stats.rollouts == {"promoted": 0, "rolled_back": 0}
    assert len(rig.procs.pids(2)) == 1                       # not judged, not promoted before the end
    rig.step(at=T0 + 12)
    m = rig.master
    assert m.stats.rollout_check_failures["latency_p99"] == 1
    # new: rank 99 of 100 in (0.05, 0.1] holding 50 from 50: 0.05 + 0.05 * 49/50; old: 400 answers, rank 396
    # in (0.01, 0.025] holding 200 from 200: 0.01 + 0.015 * 196/200.
    assert m.stats.last_reload_error.endswith("check latency_p99 failed: p99 99.0ms over 100 requests, above "
                                              "1.5x the previous 24.7ms over 400 (allowed 37.0ms)")
    assert len(rig.procs.pids(2)) == 1


def test_an_unchanged_p99_is_promoted_and_logged(rig: TrafficRig, caplog: pytest.LogCaptureFixture) -> None:
    old, new = start(rig, latency_p99={"vs_previous": 1.5})
    rig.serve(old, 100, buckets=BUCKETS_10MS)
    rig.serve([new], 100, buckets=BUCKETS_10MS)
    rig.step(at=T0 + 12)
    assert len(rig.procs.pids(2)) == 4                       # promoting
    assert "rollout check latency_p99 of generation 2 passed: p99 24.7ms over 100 requests, previous 24.7ms " \
           "over 400" in messages(caplog)


def test_p99s_under_the_floor_count_as_the_floor(rig: TrafficRig) -> None:
    old, new = start(rig, latency_p99={"vs_previous": 1.5, "floor": "5ms"})
    rig.serve(old, 100, buckets=((0.001, 100.0), (INF, 0.0)))                 # p99 about 1 ms
    rig.serve([new], 100, buckets=((0.001, 0.0), (0.005, 100.0), (INF, 0.0)))  # about 4.96 ms: under 1.5 x 5 ms
    rig.step(at=T0 + 12)
    assert rig.master.stats.rollouts["rolled_back"] == 0 and len(rig.procs.pids(2)) == 4


def test_promote_ends_the_window_before_latency_is_judged(rig: TrafficRig, caplog: pytest.LogCaptureFixture) -> None:
    old, new = start(rig, latency_p99={"vs_previous": 1.5})
    rig.master.reloads.rollouts.ask("promote 2")         # type: ignore[union-attr]
    rig.step(at=T0 + 3)
    assert len(rig.procs.pids(2)) == 4
    assert "upgraderd promote: generation 2 promoted before check latency_p99 finished" in messages(caplog)


def test_the_sampling_deadline_wakes_the_loop(rig: TrafficRig) -> None:
    start(rig, error_ratio={"max": 0.02})
    reads = rig.fake.reads
    deadlines = [d for d in rig.master.reloads.rollouts.deadlines() if d is not None]   # type: ignore[union-attr]
    assert min(deadlines) == T0 + 2.5
    rig.step(at=T0 + 2.5)
    assert rig.fake.reads == reads + 1


# -- the arithmetic --

def test_quantile_interpolates_inside_its_bucket() -> None:
    c = RequestCounts(10, 0, ((0.1, 5.0), (0.2, 5.0), (INF, 0.0)))
    assert c.quantile(0.5) == pytest.approx(0.1)
    assert c.quantile(0.99) == pytest.approx(0.1 + 0.1 * 4.9 / 5)
    assert RequestCounts(1, 0, ((0.1, 0.0), (INF, 1.0))).quantile(0.99) == 0.1   # +Inf: the last bound
    assert RequestCounts().quantile(0.99) is None


def test_generation_counts_take_deltas_per_pid_and_keep_the_gone() -> None:
    g = GenerationCounts(frozenset({1}))
    g.update([1], {1: RequestCounts(100, 10)})                      # baseline of a pid there at the start
    g.update([1, 2], {1: RequestCounts(150, 20), 2: RequestCounts(30, 3)})   # 2 joined later: from 0
    assert g.total() == RequestCounts(80, 13)
    g.update([2], {2: RequestCounts(40, 3)})                        # 1 is gone: its last delta stays
    assert g.total() == RequestCounts(90, 13)
    g.update([2], {2: RequestCounts(5, 0)})                         # a count that went down: ignored
    assert g.total() == RequestCounts(90, 13)
