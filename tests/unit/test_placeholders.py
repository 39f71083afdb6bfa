"""Argv and URL placeholders: parsing, expansion, and located config errors."""

from __future__ import annotations

import pytest

from upgraderd.config import schema as config
from upgraderd.config import placeholders
from upgraderd.errors import ConfigError
from upgraderd.config.placeholders import TemplateError
from upgraderd.contract import env

CFG = config.parse("""\
listeners:
  - {name: web, port: 8000}
  - {name: pub, port: 8001, mode: worker-bind}
  - {name: v6, host: "::1", port: 8002, mode: shared}
workers: {app: echo}
""", "t.yaml")


def test_values_number_fds_in_listener_order_skipping_worker_bind():
    v = placeholders.values(CFG, slot=2, generation=7)
    assert v == {
        "slot": "2", "generation": "7",
        "addr:web": "127.0.0.1:8000", "host:web": "127.0.0.1", "port:web": "8000", "fd:web": "3",
        "addr:pub": "127.0.0.1:8001", "host:pub": "127.0.0.1", "port:pub": "8001",
        "addr:v6": "[::1]:8002", "host:v6": "::1", "port:v6": "8002", "fd:v6": "4",
    }
    assert placeholders.values(CFG, 0, 1, probe_port=25000)["probe_port"] == "25000"


@pytest.mark.parametrize("template, expected", [
    ("--fd={fd:v6}", "--fd=4"),
    ("{addr:web}", "127.0.0.1:8000"),
    ("w{slot}-g{generation}", "w2-g7"),
    ("{{fd:web}}", "{fd:web}"),
    ("a}}b{{c", "a}b{c"),
    ("{{{fd:web}}}", "{3}"),
    ("plain", "plain"),
])
def test_expand(template, expected):
    assert placeholders.expand(template, placeholders.values(CFG, 2, 7)) == expected


@pytest.mark.parametrize("template", ["{", "a}b", "{fd:web", "x{y"])
def test_unmatched_braces_are_errors(template):
    with pytest.raises(TemplateError, match="unmatched"):
        placeholders.fields(template)


def test_environment_names_every_listener_and_the_worker_bind_ones():
    v = placeholders.values(CFG, 0, 1, probe_port=25000)
    assert placeholders.environment(CFG, v) == {
        "UPGRADERD_ADDR_WEB": "127.0.0.1:8000", "UPGRADERD_ADDR_PUB": "127.0.0.1:8001",
        "UPGRADERD_ADDR_V6": "[::1]:8002", "UPGRADERD_WORKER_BIND": "pub",
        "UPGRADERD_PROBE_PORT": "25000", "UPGRADERD_LOG_FORMAT": "text",
    }
    assert env.addr_env_name("web-2.a") == "UPGRADERD_ADDR_WEB_2_A"


BAD = """\
listeners:
  - {name: web, port: 8000}
  - {name: pub, port: 8001, mode: worker-bind}
workers:
  command:
    - /bin/true
    - "--fd={fd:wbe}"
    - "{fd:pub}"
    - "{slto}"
    - "a{b"
    - "{probe_port}"
ready:
  url: "http://example.org/{slot}"
"""


def test_config_errors_name_file_line_column_key_and_value():
    with pytest.raises(ConfigError) as e:
        config.parse(BAD, "bad.yaml")
    assert e.value.problems == [
        "bad.yaml:7:7: workers.command[1]: {fd:wbe} names no listener (did you mean {fd:web}?); "
        "listeners: web, pub",
        "bad.yaml:8:7: workers.command[2]: {fd:pub}: listener 'pub' is worker-bind, so the master "
        "passes no fd for it; use {addr:pub} and bind it in the worker",
        "bad.yaml:9:7: workers.command[3]: unknown placeholder {slto} (did you mean {slot}?); known: "
        + placeholders.KNOWN + " (write {{ and }} for literal braces)",
        "bad.yaml:10:7: workers.command[4]: unmatched '{' at character 2 of 'a{b'; "
        "write '{{' for a literal brace",
        "bad.yaml:11:7: workers.command[5]: {probe_port} is only set with ready.mode http",
        "bad.yaml:13:8: ready.url: 'http://example.org/0': the host must be an IP address or "
        "localhost, not 'example.org' (the master does not resolve names)",
    ]


@pytest.mark.parametrize("url, problem", [
    ("https://127.0.0.1:{probe_port}/", "is not an http://HOST[:PORT]/PATH URL"),
    ("http://127.0.0.1:99999/", "port 99999 is out of range"),
    ("http://127.0.0.1:{port:nope}/", "{port:nope} names no listener"),
])
def test_bad_ready_urls(url, problem):
    text = f"listeners: [{{name: web, port: 8000}}]\nworkers: {{app: echo}}\n" \
           f"ready: {{mode: http, url: '{url}'}}\n"
    with pytest.raises(ConfigError) as e:
        config.parse(text, "u.yaml")
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith("u.yaml:3:")
    assert problem in e.value.problems[0]


def test_a_good_http_readiness_config_loads():
    cfg = config.parse("listeners: [{name: web, port: 8000}]\n"
                       "workers: {command: [/bin/true, '--health={probe_port}', '{{x}}']}\n"
                       "ready: {mode: http, url: 'http://localhost:{probe_port}/healthz?full=1'}\n")
    assert cfg.ready.url == "http://localhost:{probe_port}/healthz?full=1"


def test_listener_names_that_map_to_one_variable_are_an_error():
    with pytest.raises(ConfigError) as e:
        config.parse("listeners:\n  - {name: a-b, port: 8000}\n  - {name: a_b, port: 8001}\n"
                     "workers: {app: echo}\n", "n.yaml")
    assert e.value.problems == ["n.yaml:3:5: listeners[1].name: 'a_b' and 'a-b' would both set "
                                "UPGRADERD_ADDR_A_B in the workers' environment; rename one"]
