"""`rollout.checks.error_ratio` and `latency_p99` (config/trafficspec.py): defaults, located errors, the cross-checks."""

from __future__ import annotations

import pytest

from upgraderd.config import schema
from upgraderd.config.trafficspec import ErrorRatioSpec, LatencySpec
from upgraderd.core.handover import config_from_dict, config_to_dict
from upgraderd.errors import ConfigError

CANARY = "rollout:\n  strategy: canary\n  checks:\n"


def parse(workers: str, checks: str, extra: str = "") -> schema.Config:
    return schema.parse(f"listeners: [{{name: web, port: 8080}}]\nworkers: {workers}\n{extra}{CANARY}{checks}",
                        "t.yaml")


def problems(workers: str, checks: str, extra: str = "") -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(workers, checks, extra)
    return e.value.problems


def test_defaults_and_a_usr2_hand_over() -> None:
    cfg = parse("{app: http, count: 4}", "    error_ratio: {max: 0.02, vs_previous: 2}\n    latency_p99: {}\n")
    assert cfg.rollout.checks.error_ratio == ErrorRatioSpec(max=0.02, vs_previous=2.0, min_requests=100)
    assert cfg.rollout.checks.latency_p99 == LatencySpec(vs_previous=1.5, min_requests=100, floor=0.01)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert parse('{app: "asgi:tests.fixtures.asgi_routes:app", count: 2}', "    error_ratio: {}\n").rollout.checks.error_ratio == \
        ErrorRatioSpec(max=1.0, vs_previous=None, min_requests=100)


def test_bad_values_are_located() -> None:
    assert problems("{app: http, count: 4}", "    error_ratio: {max: 2, vs_previous: 0.5, min_requests: 0}\n"
                    "    latency_p99: {vs_previous: fast}\n") == [
        "t.yaml:6:24: rollout.checks.error_ratio.max: 2 is not a share between 0 and 1 (0.02 is 2%)",
        "t.yaml:6:40: rollout.checks.error_ratio.vs_previous: 0.5 is not a factor of at least 1 (1.5 allows 50% "
        "more than the previous generation)",
        "t.yaml:6:59: rollout.checks.error_ratio.min_requests: 0 is out of range; allowed: 1..10000000",
        "t.yaml:7:32: rollout.checks.latency_p99.vs_previous: 'fast' is not a factor of at least 1 (1.5 allows "
        "50% more than the previous generation)",
    ]


def test_workers_that_count_no_requests_or_no_metrics_are_refused() -> None:
    assert problems("{app: echo, count: 4}", "    error_ratio: {max: 0.02}\n") == [
        "t.yaml:6:18: rollout.checks.error_ratio: workers.app is echo: only the built-in http app and asgi:/wsgi: "
        "apps count their requests for upgraderd (use the http or command check for other workers)"]
    assert problems("{command: [/bin/true], count: 4}", "    latency_p99: {}\n") == [
        "t.yaml:6:18: rollout.checks.latency_p99: the workers are a command: only the built-in http app and "
        "asgi:/wsgi: apps count their requests for upgraderd (use the http or command check for other workers)"]
    assert problems("{app: http, count: 4}", "    error_ratio: {}\n", "metrics: {listen: null}\n") == [
        "t.yaml:7:18: rollout.checks.error_ratio: metrics.listen is null: the master reads the workers' request "
        "counts only with metrics on"]
