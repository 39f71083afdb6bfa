"""The stream move extension's hand-off state (upgraderd/apps/asgi/streammove.py) and the standby's record.

The state is read by the taking worker from another process: a well-formed
one gives back the request's scope, status and keep-alive exactly; anything
else is a ValueError (the taker closes that socket), never another exception.
"""

from __future__ import annotations

import os

import pytest

from upgraderd.apps import preload
from upgraderd.config.schema import parse as parse_config
from upgraderd.contract.standby import parse
from upgraderd.core.prefork import standby_arg
from upgraderd.apps.asgi import streammove, wsmove
from upgraderd.contract import env as contract

SCOPE = {"type": "http", "method": "GET", "path": "/events", "root_path": "", "scheme": "http",
         "http_version": "1.1", "raw_path": b"/events", "query_string": b"count=5&x=%C3%A9",
         "headers": [(b"host", b"t"), (b"last-event-id", b"\xe9")], "client": ("127.0.0.1", 40000),
         "server": ("127.0.0.1", 8004), "extensions": {streammove.EXTENSION: streammove.extension()}}


def test_state_round_trips_the_request_and_the_apps_bytes() -> None:
    state = streammove.encode(SCOPE, 200, True, b"42\n\x00binary")
    assert streammove.is_stream(state) and not wsmove.is_websocket(state)
    scope, status, keep_alive = streammove.decode(state, {"asgi": {"version": "3.0"}, "state": {"db": 1}})
    assert (status, keep_alive) == (200, True)
    assert scope["extensions"] == {streammove.EXTENSION: {"resumed": b"42\n\x00binary", "on_move": None}}
    for key in ("type", "method", "path", "root_path", "scheme", "http_version", "raw_path", "query_string",
                "headers", "client", "server"):
        assert scope[key] == SCOPE[key], key
    assert scope["asgi"] == {"version": "3.0"} and scope["state"] == {"db": 1}


@pytest.mark.parametrize("state", [b"", b"upgraderd-ws/1\n{}\n", streammove.MAGIC + b"not json\n",
                                   streammove.MAGIC + b"[1, 2]\n", streammove.MAGIC + b'{"method": 3}\n',
                                   streammove.MAGIC + b"\xff\xfe\n"])
def test_a_state_that_is_not_a_moving_responses_is_a_value_error(state: bytes) -> None:
    with pytest.raises(ValueError):
        streammove.decode(state, {})


def test_record_keeps_the_stdlib_and_site_packages_never_the_apps_own(tmp_path, monkeypatch) -> None:
    import json.decoder  # noqa: F401  (the standard library: recorded)
    import yaml          # noqa: F401  (site-packages: recorded)
    monkeypatch.setenv(contract.HANDOFF_DIR, str(tmp_path))
    preload.record("yaml.loader")   # as if the app were a module of the yaml package: left out
    names = (tmp_path / preload.RECORD).read_text().split()
    assert "json.decoder" in names
    assert not [n for n in names if n.partition(".")[0] in ("yaml", "upgraderd")]
    assert "tests.unit.test_asgi_streammove" not in names   # this directory is neither
    assert preload._recorded() == names
    (tmp_path / preload.RECORD).write_bytes(b"ok_name\nbad name\n../x\n" + b"a" * 10)
    assert preload._recorded() == ["ok_name", "a" * 10]
    os.unlink(tmp_path / preload.RECORD)
    os.symlink("/etc/passwd", tmp_path / preload.RECORD)
    assert preload._recorded() == []   # never through a symlink


def test_the_standby_imports_the_record_unless_the_config_says_not() -> None:
    text = "listeners: [{name: web, host: 127.0.0.1, port: 8000}]\nworkers: {count: 1, app: 'asgi:json:loads', warm: true%s}\n"
    assert parse(standby_arg(parse_config(text % ", preload: [fastapi]"))) == ["asgi", "fastapi", "+recorded"]
    assert parse(standby_arg(parse_config(text % ", preload_recorded: false"))) == ["asgi"]
