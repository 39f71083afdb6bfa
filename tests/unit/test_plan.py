"""The plan diff is one line and names every changed key with its old and new value."""

from __future__ import annotations

from upgraderd.config import plan
from upgraderd.config.schema import parse
from upgraderd.config.validators import duration

BASE = """
listeners:
  - {name: web, port: 8080}
  - {name: old, port: 8081, mode: shared}
workers: {count: 4, command: [python3, app.py], env: {TOKEN: secret-1, KEEP: x}}
drain: {timeout: 30s}
"""


def _cfg(text: str):
    return parse(text, "upgraderd.yaml")


def test_start_plan_is_one_line():
    text = plan.diff(None, _cfg(BASE)).describe()
    assert text == ("plan: listeners open web 127.0.0.1:8080 (reuseport), open old 127.0.0.1:8081 "
                    "(shared); workers 4; generation new")


def test_every_changed_key_is_named_with_old_and_new_value():
    new = (BASE.replace("port: 8081, mode: shared", "port: 8082, mode: shared")
           .replace("count: 4", "count: 2").replace("app.py", "app2.py")
           .replace("timeout: 30s", "timeout: 10s")
           .replace("TOKEN: secret-1, KEEP: x", "TOKEN: secret-2, NEW: y")
           .replace("{name: web, port: 8080}", "{name: web, port: 8080, backlog: 64}")
           + "ready: {timeout: 500ms}\nlog: {format: json}\n")
    text = plan.diff(_cfg(BASE), _cfg(new)).describe()
    assert "\n" not in text
    assert text == (
        "plan: listeners keep web 127.0.0.1:8080 (reuseport), open old 127.0.0.1:8082 (shared), "
        "close after drain old 127.0.0.1:8081 (shared); workers 4 -> 2; changed "
        "workers.command: [python3, app.py] -> [python3, app2.py], "
        "workers.env.KEEP: removed, workers.env.NEW: set, workers.env.TOKEN: changed (value not shown), "
        "ready.timeout: 30s -> 500ms, drain.timeout: 30s -> 10s, log.format: text -> json, "
        "listeners[127.0.0.1:8080].backlog: 1024 -> 64; generation new")
    assert "secret" not in text


def test_an_unchanged_reload_says_so():
    text = plan.diff(_cfg(BASE), _cfg(BASE)).describe()
    assert text.endswith("; workers 4; no key changed; generation new")


def test_values_read_as_written():
    assert [plan.show(v) for v in (None, ("a", "b c"), "x", "", 3)] == ["null", "[a, b c]", "x", "''", "3"]
    assert [plan.show(v, duration) for v in (0.1, 1.0, 2.5, 120.0)] == ["100ms", "1s", "2.5s", "2m"]
