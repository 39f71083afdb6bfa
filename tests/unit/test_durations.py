"""The duration histograms keep counts per bucket and survive a state hand-over."""

from __future__ import annotations

import dataclasses
import json

import pytest

from upgraderd.core.durations import DRAIN_BUCKETS, RELOAD_BUCKETS, Durations
from upgraderd.core.stats import Stats


def test_a_value_on_a_bound_counts_in_that_bucket():
    d = Durations((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0, -0.2):
        d.observe(v)
    data = d.data()
    assert data.buckets == ((0.1, 3), (1.0, 5), (float("inf"), 6))
    assert data.count == d.count == 6
    assert data.total == pytest.approx(0.05 + 0.1 + 0.5 + 1.0 + 3.0)


def test_bounds_must_increase():
    with pytest.raises(ValueError, match="strictly increasing"):
        Durations((1.0, 0.5))
    with pytest.raises(ValueError, match="3 counts for 1 bounds"):
        Durations((1.0,), [0, 0, 0])


def test_the_default_buckets_are_valid():
    assert Durations(RELOAD_BUCKETS).count == Durations(DRAIN_BUCKETS).count == 0


def test_stats_survive_a_json_hand_over():
    stats = Stats()
    stats.reload_durations.observe(0.3)
    stats.drain_durations.observe(12.0)
    stats.reloads["success"] += 1
    copy = Stats(**json.loads(json.dumps(dataclasses.asdict(stats))))
    assert copy.reload_durations.data() == stats.reload_durations.data()
    assert copy.drain_durations.data() == stats.drain_durations.data()
    copy.reload_durations.observe(0.3)
    assert copy.reload_durations.count == 2


def test_stats_from_an_older_master_keep_their_samples():
    copy = Stats(reload_durations=[0.3, 4.0], drain_durations=[])  # type: ignore[arg-type]
    assert copy.reload_durations.data().buckets[3:6] == ((0.5, 1), (1.0, 1), (2.5, 1))
    assert copy.reload_durations.count == 2 and copy.drain_durations.count == 0


def test_a_snapshot_copy_of_the_stats_shares_nothing_the_master_mutates():
    # Stats.copy runs every loop pass for the metrics thread: one level deep, not deepcopy.
    # It is a deep copy only while every field is immutable, a dict of ints or a Durations.
    stats = Stats()
    for f in dataclasses.fields(Stats):
        value = getattr(stats, f.name)
        assert isinstance(value, (bool, int, float, str, Durations)) or (
            isinstance(value, dict) and all(isinstance(v, int) for v in value.values())), f.name
    stats.reloads["success"] = 3
    stats.reload_durations.observe(0.3)
    copy = stats.copy()
    assert copy == stats
    stats.reloads["success"] += 1
    stats.worker_exits["error"] += 1
    stats.reload_durations.observe(0.3)
    stats.drain_durations.observe(1.0)
    stats.hups += 1
    assert copy.reloads["success"] == 3 and copy.worker_exits["error"] == 0 and copy.hups == 0
    assert copy.reload_durations.count == 1 and copy.drain_durations.count == 0
    assert copy.reload_durations.bounds == stats.reload_durations.bounds
