"""Unix socket listeners in the config: `path`, `owner`, `group`, `permissions`.

Bad files get an error at the line and column of the offending key, naming
its key path, from the loader and from the real `upgraderd check`; good ones
get mode shared by default and show the path wherever an address is shown.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT
from tests.unit.test_config_errors import write_case
from upgraderd.config import placeholders, plan
from upgraderd.config import schema as config
from upgraderd.core.handover import config_from_dict, config_to_dict
from upgraderd.core.seams import key_address, key_for
from upgraderd.errors import ConfigError
from upgraderd.service import cli

W = "workers: {app: http}\n"
U = "listeners:\n  - name: app\n    path: /run/app.sock\n"   # a Unix listener, its keys at column 5

# (id, config text, "line:column: key.path", a phrase the message must contain)
CASES = [
    ("path-and-host", U + "    host: 127.0.0.1\n" + W,
     "4:11: listeners[0].host", "`path` and `host`/`port` are mutually exclusive"),
    ("path-and-port", U + "    port: 8080\n" + W,
     "4:11: listeners[0].port", "this listener is the Unix socket /run/app.sock; remove `port`"),
    ("path-reuseport", U + "    mode: reuseport\n" + W,
     "4:11: listeners[0].mode", "mode reuseport does not apply to a Unix socket (SO_REUSEPORT groups"),
    ("path-worker-bind", U + "    mode: worker-bind\n" + W,
     "4:11: listeners[0].mode", "mode worker-bind does not apply to a Unix socket"),
    ("path-relative", "listeners:\n  - {name: app, path: run/app.sock}\n" + W,
     "2:23: listeners[0].path", "'run/app.sock' is not an absolute path"),
    ("path-too-long", "listeners:\n  - {name: app, path: /" + "d" * 120 + "}\n" + W,
     "2:23: listeners[0].path", "is 121 bytes long; a Unix socket path holds at most 107"),
    ("path-directory", "listeners:\n  - {name: app, path: /run/}\n" + W,
     "2:23: listeners[0].path", "names a directory"),
    ("path-empty", "listeners:\n  - {name: app, path: ''}\n" + W,
     "2:23: listeners[0].path", "expected a non-empty string"),
    ("permissions-unquoted", U + "    permissions: 0660\n" + W,
     "4:18: listeners[0].permissions", "432 is a number; write the permissions in quotes, e.g. \"0660\""),
    ("permissions-not-octal", U + "    permissions: '0980'\n" + W,
     "4:18: listeners[0].permissions", "'0980' is not an octal file mode"),
    ("permissions-setuid", U + "    permissions: '4755'\n" + W,
     "4:18: listeners[0].permissions", "no setuid, setgid or sticky bit"),
    ("owner-no-such-user", U + "    owner: no-such-user-here\n" + W,
     "4:12: listeners[0].owner", "no such user: 'no-such-user-here'"),
    ("group-no-such-group", U + "    group: no-such-group-here\n" + W,
     "4:12: listeners[0].group", "no such group: 'no-such-group-here'"),
    ("owner-on-tcp", "listeners:\n  - name: web\n    port: 8080\n    owner: root\n" + W,
     "4:12: listeners[0].owner", "only a Unix socket listener (with `path`) takes `owner`"),
    ("permissions-on-tcp", "listeners:\n  - name: web\n    port: 8080\n    permissions: '0660'\n" + W,
     "4:18: listeners[0].permissions", "takes `permissions`"),
    ("neither-path-nor-port", "listeners:\n  - name: web\n    host: 127.0.0.1\n" + W,
     "2:5: listeners[0].port", "is required (or give `path` for a Unix socket)"),
    ("duplicate-path", U + "  - {name: api, path: /run/./app.sock}\n" + W,
     "4:5: listeners[1]", "duplicate address /run/app.sock (also listeners[0])"),
    ("port-placeholder-of-unix", U + "workers: {command: ['true', '--port={port:app}']}\n",
     "4:29: workers.command[1]", "{port:app}: listener 'app' is the Unix socket /run/app.sock"),
]


@pytest.mark.parametrize("text, where, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_unix_listener(tmp_path, capsys, text, where, phrase):
    path = write_case(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config.load(str(path))
    first = e.value.problems[0]
    assert first.startswith(f"{path}:{where}:"), first
    assert phrase in first, first
    assert cli.main(["check", "-c", str(path)]) == 1
    assert capsys.readouterr().err.splitlines()[0] == first


@pytest.mark.parametrize("case", ["path-and-host", "path-reuseport", "permissions-unquoted"])
def test_real_check_command_locates_unix_keys(tmp_path, case):
    text, where, phrase = next(c[1:] for c in CASES if c[0] == case)
    path = write_case(tmp_path, text)
    r = subprocess.run([sys.executable, "-m", "upgraderd", "check", "-c", str(path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    first = r.stderr.splitlines()[0]
    assert first.startswith(f"{path}:{where}:") and phrase in first, first


def test_path_listener_defaults_to_shared_and_shows_its_path():
    cfg = config.parse(U + "    permissions: '660'\n    backlog: 64\n"
                       "  - {name: web, port: 8080}\n" + W)
    app, web = cfg.listeners
    assert (app.path, app.mode, app.permissions, app.port) == ("/run/app.sock", "shared", "0660", None)
    assert web.mode == "reuseport" and web.path is None
    assert app.address == "/run/app.sock"
    assert key_for(app, 3) == ("/run/app.sock", 0, "shared", 0)
    assert key_address(key_for(app, 0)) == "/run/app.sock"
    assert key_address(key_for(web, 1)) == "127.0.0.1:8080"
    assert plan.diff(None, cfg).describe().startswith(
        "plan: listeners open app /run/app.sock (shared), open web 127.0.0.1:8080 (reuseport)")
    vals = placeholders.values(cfg, 0, 1)
    assert vals["addr:app"] == "/run/app.sock" and vals["fd:app"] == "3"
    assert "port:app" not in vals and vals["port:web"] == "8080"
    assert placeholders.environment(cfg, vals)["UPGRADERD_ADDR_APP"] == "/run/app.sock"
    # A USR2 hand-over carries the listener unchanged.
    assert config_from_dict(config_to_dict(cfg)).listeners == cfg.listeners


def test_keeping_a_path_listener_changes_nothing_in_the_plan():
    a = config.parse(U + W)
    b = config.parse(U + "    backlog: 10\n" + W)
    p = plan.diff(a, b)
    assert [s.name for s in p.keep] == ["app"] and not p.open and not p.close
    assert p.changes == ("listeners[/run/app.sock].backlog: 1024 -> 10",)


def test_explicit_shared_mode_and_ownership_are_accepted():
    cfg = config.parse(U + "    mode: shared\n    owner: root\n    group: '0'\n" + W)
    assert (cfg.listeners[0].owner, cfg.listeners[0].group) == ("root", "0")
