"""`app: asgi:...` / `wsgi:...` and the `http:` section: accepted values and located errors."""

from __future__ import annotations

import json

import pytest

from tests.support import ROOT
from upgraderd.apps.asgi.settings import Settings, from_environment
from upgraderd.config import placeholders
from upgraderd.config.schema import parse
from upgraderd.errors import ConfigError

EXAMPLES = ROOT / "config" / "examples"


def config(app: str, http: str = "") -> str:
    return (f"listeners: [{{name: web, port: 8080}}]\nworkers: {{app: '{app}', cwd: '{EXAMPLES}'}}\n"
            + (f"http:\n{http}" if http else ""))


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(text, "a.yaml")
    return e.value.problems


def test_an_asgi_app_is_forked_from_a_template_and_gets_its_http_settings():
    cfg = parse(config("asgi:asgi_app:app", "  max_body_bytes: 1024\n  trusted_proxies: [10.0.0.1, 192.168.0.0/16]\n"))
    assert cfg.prefork and cfg.worker_argv[-1] == "asgi:asgi_app:app"
    env = placeholders.environment(cfg, {})
    settings = from_environment(env)
    assert settings.max_body_bytes == 1024
    assert settings.trusted_proxies == ("10.0.0.1/32", "192.168.0.0/16")
    assert settings.trusts("192.168.3.4") and not settings.trusts("10.0.0.2")
    assert json.loads(env["UPGRADERD_HTTP"])["header_timeout"] == 10.0
    assert settings.drain_timeout == cfg.drain.timeout   # when the worker ends what is still in progress


def test_the_busy_limit_reaches_the_worker_with_the_names_of_the_shared_listeners():
    text = ("listeners:\n  - {name: web, port: 8080, mode: shared}\n  - {name: api, port: 8081}\n"
            "  - {name: sock, path: /run/app.sock}\n"
            f"workers: {{app: 'asgi:asgi_app:app', cwd: '{EXAMPLES}'}}\nhttp: {{busy_limit: 3}}\n")
    settings = from_environment(placeholders.environment(parse(text, "a.yaml"), {}))
    assert settings.busy_limit == 3
    assert settings.shared == ("web", "sock")   # a Unix socket is one queue for all workers too
    assert from_environment(placeholders.environment(parse(config("asgi:asgi_app:app")), {})).busy_limit == 8


def test_a_command_worker_gets_no_http_variable():
    cfg = parse(config("echo"))
    assert "UPGRADERD_HTTP" not in placeholders.environment(cfg, {})


@pytest.mark.parametrize("app, message", [
    ("asgi:asgi_app", "a.yaml:2:16: workers.app: 'asgi:asgi_app' is not `asgi:package.module:app`"),
    ("wsgi:no_such_module:app", "a.yaml:2:16: workers.app: module 'no_such_module' not found"),
    ("asgi:asgi_app:app:x", "a.yaml:2:16: workers.app: 'asgi:asgi_app:app:x' is not `asgi:package.module:app`"),
])
def test_a_bad_app_spec_is_named_with_its_location(app, message):
    assert problems(config(app))[0].startswith(message)


@pytest.mark.parametrize("http, message", [
    ("  trusted_proxies: [10.0.0.300]\n", "a.yaml:4:20: http.trusted_proxies: '10.0.0.300' is not an IP address"),
    ("  root_path: api/\n", "a.yaml:4:14: http.root_path: 'api/': a root path starts with /"),
    ("  max_header_bytes: 10\n", "a.yaml:4:21: http.max_header_bytes: 10 is out of range"),
    ("  lifespan: maybe\n", "a.yaml:4:13: http.lifespan:"),
    ("  max_headers: 10\n", "a.yaml:4:3: http.max_headers: unknown key"),
    ("  busy_limit: -1\n", "a.yaml:4:15: http.busy_limit: -1 is out of range"),
])
def test_a_bad_http_value_is_named_with_its_location(http, message):
    assert problems(config("asgi:asgi_app:app", http))[0].startswith(message)


def test_unreadable_settings_fall_back_to_the_defaults():
    assert from_environment({"UPGRADERD_HTTP": "{not json"}) == Settings()
    assert from_environment({"UPGRADERD_HTTP": '{"unknown": 1, "access_log": false}'}) == Settings(access_log=False)
