"""Values that used to pass `upgraderd check` and then raise in a reload or a spawn.

Each case names the exact location, key path and a phrase of the message. The
second half runs every value that `check` accepts (the boundary values) through
the code that start, reload and spawn run, over the fake process layer: none
of them may raise there.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from upgraderd.config import schema as config
from upgraderd.config import validators
from upgraderd.errors import ConfigError
from upgraderd.service import cli
from upgraderd.system.process import privilege_argv, user_env

L = "listeners:\n  - {name: web, port: 8080}\n"
W = "workers: {app: echo}\n"

# (id, config text, "line:column: key.path", a phrase the message must contain)
CASES = [
    ("nul-in-argv", L + 'workers: {command: ["/bin/true", "a\\0b"]}\n',
     "3:20: workers.command", "argument 1: 'a\\x00b' contains a NUL byte"),
    ("nul-in-env-value", L + 'workers: {app: echo, env: {A: "x\\0"}}\n',
     "3:27: workers.env", "the value of A: 'x\\x00' contains a NUL byte"),
    ("nul-in-cwd", L + 'workers: {app: echo, cwd: "/tmp\\0"}\n',
     "3:27: workers.cwd", "contains a NUL byte"),
    ("nul-in-user", L + 'workers: {app: echo, user: "root\\0"}\n',
     "3:28: workers.user", "contains a NUL byte"),
    ("nul-in-group", L + 'workers: {app: echo, group: "\\0"}\n',
     "3:29: workers.group", "contains a NUL byte"),
    ("nul-in-log-file", L + W + 'log: {file: "up.log\\0"}\n',
     "4:13: log.file", "contains a NUL byte"),
    ("nul-in-pidfile", L + W + 'pidfile: "u.pid\\0"\n',
     "4:10: pidfile", "contains a NUL byte"),
    ("nul-in-metrics-dir", L + W + 'metrics: {dir: "/tmp/m\\0"}\n',
     "4:16: metrics.dir", "contains a NUL byte"),
    ("nul-in-ready-url", L + W + 'ready: {mode: http, url: "http://127.0.0.1:1/\\0"}\n',
     "4:26: ready.url", "contains a NUL byte"),
    ("nul-in-host-scope", 'listeners:\n  - {name: w, port: 1, host: "fe80::1%a\\0b"}\n' + W,
     "2:30: listeners[0].host", "contains a NUL byte"),
    ("non-ascii-host-scope", 'listeners:\n  - {name: w, port: 1, host: "fe80::1%\u0663"}\n' + W,
     "2:30: listeners[0].host", "is not an interface name"),
    ("surrogate-in-argv", L + 'workers: {command: ["/bin/true", "\\ud800"]}\n',
     "3:20: workers.command", "no UTF-8 encoding"),
    ("surrogate-in-env", L + 'workers: {app: echo, env: {A: "\\udfff"}}\n',
     "3:27: workers.env", "no UTF-8 encoding"),
    ("arabic-digit-user", L + "workers: {app: echo, user: \u0663}\n",
     "3:28: workers.user", "is not a user name or an ASCII number"),
    ("superscript-digit-group", L + "workers: {app: echo, group: \u00b2}\n",
     "3:29: workers.group", "is not a group name or an ASCII number"),
    ("huge-uid", L + "workers: {app: echo, user: 99999999999999999999999}\n",
     "3:28: workers.user", "no such user"),
    ("huge-int-duration", L + W + "drain: {timeout: 1" + "0" * 400 + "}\n",
     "4:18: drain.timeout", "is too long; allowed: 0 .. 3.1536e+07s"),
    ("negative-huge-duration", L + W + "drain: {timeout: -1" + "0" * 400 + "}\n",
     "4:18: drain.timeout", "is not a duration >= 0"),
    ("float-overflow-duration", L + W + "ready: {timeout: 1.0e+309}\n",
     "4:18: ready.timeout", "inf is not a duration >= 0"),
    ("nan-duration", L + W + "restart: {backoff: .nan}\n",
     "4:20: restart.backoff", "is not a duration >= 0"),
    ("long-duration-string", L + W + "restart: {max_backoff: 99999999999999999999h}\n",
     "4:24: restart.max_backoff", "is too long"),
    ("unit-overflow-duration", L + W + "ready: {after: 8761h}\n",
     "4:16: ready.after", "is too long"),
    ("non-ascii-digit-duration", L + W + "ready: {timeout: \u0663s}\n",
     "4:18: ready.timeout", "is not a duration"),
    ("non-ascii-metrics-port", L + W + "metrics: {listen: '127.0.0.1:\u0669\u0661'}\n",
     "4:19: metrics.listen", "is not host:port"),
    ("metrics-dir-is-a-file", L + W + "metrics: {dir: /etc/hostname}\n",
     "4:16: metrics.dir", "exists and is not a directory"),
    ("ready-url-whitespace", L + W + "ready: {mode: http, url: 'http://127.0.0.1:1/a b'}\n",
     "4:26: ready.url", "contains whitespace or a control character"),
    ("recursive-alias", "listeners: &l [*l]\n",
     "1:12: ", "a YAML alias refers to a value that contains it"),
    ("huge-count", L + "workers: {app: echo, count: 1" + "0" * 30 + "}\n",
     "3:29: workers.count", "is out of range; allowed: 1..1024"),
]


@pytest.mark.parametrize("text, where, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_value_is_a_located_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          text: str, where: str, phrase: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        config.load(str(path))
    first = e.value.problems[0]
    assert first.startswith(f"{path}:{where}"), first
    assert phrase in first, first
    assert cli.main(["check", "-c", str(path)]) == 1
    assert capsys.readouterr().err.splitlines()[0] == first


def bomb(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + f"\nlisteners: *a{levels}\n"


def test_alias_bomb_is_refused_before_any_value_is_built(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb(9))  # 10**10 values once expanded
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        config.load(str(path))
    # The innermost list past the cap: a4 (line 5) expands to 111,111 values.
    assert e.value.problems == [f"{path}:5:5: YAML aliases expand this value past 100000 values "
                                "(an alias bomb?); write the values out"]
    assert time.monotonic() - t0 < 5  # a guard against a hang, not a speed claim


def test_a_few_aliases_are_fine() -> None:
    text = "base: &b {name: web, port: 8080}\nlisteners: [*b]\nworkers: {app: echo}\n"
    with pytest.raises(ConfigError) as e:  # `base` is no key of ours: the aliases themselves passed
        config.parse(text, "a.yaml")
    assert e.value.problems == ["a.yaml:1:1: base: unknown key; allowed: listeners, workers, ready, "
                                "drain, restart, metrics, log, kernel, reload, http, name, pidfile"]


@pytest.mark.parametrize("size", [config.MAX_BYTES + 1, 10 * 1024 * 1024])
def test_oversized_file_is_refused_before_parsing(tmp_path: Path, size: int) -> None:
    path = tmp_path / "big.yaml"
    # Valid YAML to the end: only the size can make it fail.
    body = L + W + "# " + "x" * (size - len(L) - len(W) - 3) + "\n"
    path.write_text(body)
    assert path.stat().st_size == size
    with pytest.raises(ConfigError) as e:
        config.load(str(path))
    assert e.value.problems == [f"{path}: the config is {size} bytes; at most 1048576 (1024 KiB) are read"]


def test_file_just_under_the_cap_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(L + W + "# " + "x" * (config.MAX_BYTES - len(L) - len(W) - 3) + "\n")
    assert path.stat().st_size == config.MAX_BYTES
    assert config.load(str(path)).listeners[0].port == 8080


# -- what check accepts, spawn and reload can use --

@pytest.mark.parametrize("value", ["0", 0, "root", "daemon"])
def test_accepted_user_names_resolve_where_the_worker_is_spawned(value: object) -> None:
    name = validators.user_name(value)
    privilege_argv(name, None)  # must not raise
    assert user_env(name)["USER"] in ("root", "daemon")


@pytest.mark.parametrize("value, seconds", [
    (0, 0.0), ("0ms", 0.0), ("8760h", validators.MAX_DURATION), (validators.MAX_DURATION, 31536000.0),
    (31536000, 31536000.0), ("1.5s", 1.5), (" 2m ", 120.0),
])
def test_duration_bounds(value: object, seconds: float) -> None:
    assert validators.duration(value) == seconds


def test_accepted_strings_survive_exec_encoding() -> None:
    for s in ("caf\u00e9", "\u0663", "\U0001f600"):
        assert os.fsencode(validators.text(s)).decode("utf-8") == s
    argv = validators.argv([sys.executable, "caf\u00e9", 3, 1.5])
    assert argv == (sys.executable, "caf\u00e9", "3", "1.5")


@pytest.mark.parametrize("s", ["\udc80x", "\ud800", "a\udfffb"])
def test_every_surrogate_is_refused(s: str) -> None:
    # '\udc80' is how Python spells a non-UTF-8 byte: exec takes it, a UTF-8 log file does not.
    with pytest.raises(validators.Invalid, match="no UTF-8 encoding"):
        validators.text(s)
