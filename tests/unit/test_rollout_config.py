"""The `rollout:` section: located errors, and every key not built yet refused by name."""

from __future__ import annotations

import pytest

from upgraderd.config import schema
from upgraderd.core.handover import config_from_dict, config_to_dict
from upgraderd.errors import ConfigError

BASE = "listeners: [{name: web, port: 8080}]\nworkers: {app: echo, count: 4}\n"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        schema.parse(BASE + text, "r.yaml")
    return e.value.problems


def test_the_design_keys_not_built_yet_are_refused_by_name() -> None:
    assert problems(
        "rollout:\n"
        "  strategy: canary\n"
        "  canary: {workers: \"10%\"}\n") == [
        "r.yaml:5:21: rollout.canary.workers: a share of new connections ('10%') is not supported yet; give a "
        "number of workers, e.g. 1",
    ]
    assert problems("rollout: {strategy: blue-green}\n") == [
        "r.yaml:3:21: rollout.strategy: 'blue-green' is not allowed; allowed: all-at-once, canary, batches"]


def test_cross_checks_name_their_lines() -> None:
    assert problems(
        "rollout:\n"
        "  strategy: canary\n"
        "  canary: {workers: 4, window: 5s}\n"
        "  checks:\n"
        "    http: {url: \"http://127.0.0.1:{probe_port}/healthz\"}\n"
        "    command: [/bin/true, \"{slot}\"]\n") == [
        "r.yaml:5:21: rollout.canary.workers: 4 is not less than workers.count (4): the canary would be the "
        "whole generation",
        "r.yaml:7:17: rollout.checks.http.url: {probe_port} is only set with ready.mode http",
        "r.yaml:8:26: rollout.checks.command[1]: {slot}: the command runs once per rollout, not per worker; "
        "only {generation} is set",
    ]
    assert problems("rollout: {checks: {crashes: 2}}\n") == [
        "r.yaml:3:19: rollout.checks: only a canary or batches have checks; set rollout.strategy: canary (or "
        "remove the key)"]
    assert problems("rollout: {strategy: canary, batches: {size: 2}}\n") == [
        "r.yaml:3:38: rollout.batches: only batches have batches; set rollout.strategy: batches (or remove the key)"]
    assert problems("rollout: {strategy: canary, canary: {window: 30}, checks: {http: {every: 1s}}}\n") == [
        "r.yaml:3:66: rollout.checks.http.url: is required"]


def test_a_canary_config_survives_a_usr2_hand_over() -> None:
    cfg = schema.parse(BASE + "ready: {mode: http, url: \"http://127.0.0.1:{probe_port}/ready\"}\n"
                       "rollout:\n  strategy: canary\n  canary: {workers: 2, window: 1m}\n"
                       "  checks: {crashes: 1, http: {url: \"http://127.0.0.1:{probe_port}/h\", timeout: 2s},"
                       " command: [/bin/true, \"{generation}\"]}\n")
    assert cfg.rollout.canary.window == 60.0 and cfg.rollout.checks.command == ("/bin/true", "{generation}")
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_a_canary_is_refused_for_udp_cookie_flows() -> None:
    with pytest.raises(ConfigError) as e:
        schema.parse("listeners: [{name: u, port: 9000, protocol: udp, flows: cookie}]\n"
                     "workers: {app: echo, count: 2}\nrollout: {strategy: canary}\n", "u.yaml")
    assert e.value.problems == [
        "u.yaml:3:21: rollout.strategy: a canary cannot serve listeners[0] (u, flows: cookie) yet: new flows go "
        "to the serving generation's own sockets only, so the canary would get none"]


def test_batches_are_declared_with_their_size_and_pause() -> None:
    cfg = schema.parse(BASE + "rollout: {strategy: batches, batches: {size: 2, pause: 500ms}, checks: {crashes: 1}}\n",
                       "r.yaml")
    assert (cfg.rollout.strategy, cfg.rollout.batches.size, cfg.rollout.batches.pause) == ("batches", 2, 0.5)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert schema.parse(BASE + "rollout: {strategy: batches}\n", "r.yaml").rollout.batches.pause == 5.0
    assert problems("rollout: {strategy: batches, batches: {size: 0}}\n") == [
        "r.yaml:3:46: rollout.batches.size: 0 is out of range; allowed: 1..1024"]
