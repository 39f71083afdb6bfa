"""Bad config files: every error names file:line:column, the key path and the value.

Each case is a whole config file. The test asserts the exact location and key
path of the first error, a phrase of its message, and that `upgraderd check`
exits 1. A few cases also run the real `upgraderd check` as a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import ROOT
from upgraderd.service import cli
from upgraderd.config import schema as config
from upgraderd.errors import ConfigError

L = "listeners:\n  - {name: web, port: 8080}\n"  # a valid first line pair for cases that need one

# (id, config text, "line:column: key.path", a phrase the message must contain)
CASES = [
    ("port-too-big", "listeners:\n  - name: web\n    port: 70000\n",
     "3:11: listeners[0].port", "70000 is out of range; allowed: 1..65535"),
    ("port-zero", "listeners:\n  - {name: web, port: 0}\n",
     "2:23: listeners[0].port", "0 is out of range"),
    ("port-not-int", "listeners:\n  - {name: web, port: http}\n",
     "2:23: listeners[0].port", "expected an integer, got 'http'"),
    ("port-unreadable-int", "listeners:\n  - {name: web, port: !!int x}\n",
     "2:23: listeners[0].port", "cannot read this value"),
    ("port-missing", "listeners:\n  - {name: web}\n",
     "2:5: listeners[0].port", "is required"),
    ("duplicate-name", L + "  - {name: web, port: 8081}\n",
     "3:5: listeners[1].name", "duplicate listener name 'web' (also listeners[0])"),
    ("duplicate-address", L + "  - {name: api, port: 8080, host: 127.0.0.1}\n",
     "3:5: listeners[1]", "duplicate address 127.0.0.1:8080 (also listeners[0])"),
    ("duplicate-ipv6-address", "listeners:\n  - {name: a, host: '::1', port: 1}\n"
                               "  - {name: b, host: '0:0::1', port: 1}\n",
     "3:5: listeners[1]", "duplicate address [0:0::1]:1"),
    ("bad-host", "listeners:\n  - {name: web, host: 999.1.1.1, port: 1}\n",
     "2:23: listeners[0].host", "'999.1.1.1' is not an IPv4 or IPv6 address"),
    ("mode-typo", "listeners:\n  - {name: web, port: 1, mode: reuseprot}\n",
     "2:32: listeners[0].mode", "did you mean 'reuseport'?"),
    ("backlog-zero", "listeners:\n  - {name: web, port: 1, backlog: 0}\n",
     "2:35: listeners[0].backlog", "0 is out of range; allowed: 1..65535"),
    ("bad-listener-name", "listeners:\n  - {name: 'a b', port: 1}\n",
     "2:12: listeners[0].name", "'a b' is not a valid name"),
    ("listener-not-mapping", "listeners:\n  - 8080\n",
     "2:5: listeners[0]", "expected a mapping, got 8080"),
    ("listeners-empty", "listeners: []\n",
     "1:12: listeners", "expected a non-empty list of listeners"),
    ("listeners-missing", "workers: {app: echo}\n",
     "1:1: listeners", "is required"),
    ("count-zero", L + "workers: {app: echo, count: 0}\n",
     "3:29: workers.count", "0 is out of range; allowed: 1..1024"),
    ("count-negative", L + "workers:\n  app: echo\n  count: -3\n",
     "5:10: workers.count", "-3 is out of range"),
    ("unknown-signal", L + "drain:\n  signal: TREM\n",
     "4:11: drain.signal", "'TREM' is not a signal name (did you mean 'TERM'?); allowed: TERM"),
    ("command-not-on-path", L + "workers:\n  command: [no-such-program-x, --flag]\n",
     "4:13: workers.command[0]", "'no-such-program-x' is not on PATH ("),
    ("command-not-executable", L + "workers:\n  command: ['{tmp}/not-executable.sh']\n",
     "4:13: workers.command[0]", "not-executable.sh' is not executable (no x permission)"),
    ("command-missing-file", L + "workers:\n  command: '{tmp}/missing-program'\n",
     "4:12: workers.command[0]", "missing-program': no such file"),
    ("command-is-directory", L + "workers:\n  command: ['{tmp}']\n",
     "4:13: workers.command[0]", "is a directory, not a program"),
    ("app-and-command", L + "workers: {app: echo, command: [/bin/true]}\n",
     "3:10: workers", "set exactly one of `app` (echo, http) or `command`"),
    ("no-app-no-command", L + "workers: {count: 2}\n",
     "3:10: workers", "set exactly one of `app`"),
    ("unknown-app", L + "workers: {app: ecko}\n",
     "3:16: workers.app", "'ecko' is not one of echo, http (did you mean 'echo'?)"),
    ("threads-with-command", L + "workers: {command: [/bin/true], threads: 4}\n",
     "3:42: workers.threads", "only the built-in apps take `threads`"),
    ("no-such-user", L + "workers: {app: echo, user: no-such-user-x}\n",
     "3:28: workers.user", "no such user: 'no-such-user-x'"),
    ("no-such-group", L + "workers: {app: echo, group: no-such-group-x}\n",
     "3:29: workers.group", "no such group: 'no-such-group-x'"),
    ("bad-env-name", L + "workers:\n  app: echo\n  env: {1X: y}\n",
     "5:8: workers.env", "'1X' is not a valid environment variable name"),
    ("cwd-missing", L + "workers: {app: echo, cwd: /no/such/dir}\n",
     "3:27: workers.cwd", "'/no/such/dir' is not an existing directory"),
    ("unknown-top-key", "listners:\n  - {name: web, port: 1}\n",
     "1:1: listners", "unknown key (did you mean 'listeners'?)"),
    ("unknown-nested-key", L + "workers: {app: echo, cont: 3}\n",
     "3:22: workers.cont", "unknown key (did you mean 'count'?); allowed: count, app"),
    ("duplicate-key", "listeners:\n  - name: web\n    port: 1\n    port: 2\n",
     "4:5: listeners[0].port", "duplicate key"),
    ("non-string-key", L + "1: x\n",
     "3:1: ", "keys must be strings, got 1"),
    ("bad-duration", L + "ready:\n  timeout: 10 sec\n",
     "4:12: ready.timeout", "'10 sec' is not a duration; write e.g. 500ms, 30s or 2m"),
    ("negative-duration", L + "drain: {timeout: -5s}\n",
     "3:18: drain.timeout", "'-5s' is not a duration"),
    ("infinite-duration", L + "restart: {backoff: .inf}\n",
     "3:20: restart.backoff", "inf is not a duration >= 0"),
    ("ready-mode-typo", L + "ready: {mode: notfy}\n",
     "3:15: ready.mode", "did you mean 'notify'?"),
    ("crash-loop-zero", L + "restart: {crash_loop: 0}\n",
     "3:23: restart.crash_loop", "0 is out of range; allowed: 1..1000"),
    ("metrics-listen", L + "metrics: {listen: 9108}\n",
     "3:19: metrics.listen", "9108 is not host:port"),
    ("log-format", L + "log: {format: xml}\n",
     "3:15: log.format", "'xml' is not one of text, json"),
    ("log-level-case", L + "log: {level: INFO}\n",
     "3:14: log.level", "(did you mean 'info'?)"),
    ("log-file-dir-missing", L + "log: {file: /no/such/dir/upgraderd.log}\n",
     "3:13: log.file", "directory '/no/such/dir' does not exist"),
    ("pidfile-is-directory", L + "pidfile: /tmp\n",
     "3:10: pidfile", "'/tmp' is a directory; name a file"),
    ("section-not-mapping", L + "workers: 4\n",
     "3:10: workers", "expected a mapping, got 4"),
    ("kernel-setting", L + "kernel: {tcp_migrate_req: yes}\n",
     "3:27: kernel.tcp_migrate_req", "'yes' is not one of check, set, ignore"),
    ("yaml-unclosed-bracket", "listeners: [{name: web, port: 1}\nworkers: {app: echo}\n",
     "2:1: YAML syntax error", "expected ',' or ']', but got '<scalar>' (while parsing a flow sequence at 1:12)"),
    ("yaml-bad-indent", "listeners:\n  - name: web\n   port: 1\n",
     "3:4: YAML syntax error", ""),
    ("yaml-tab", "listeners:\n\t- name: web\n",
     "2:1: YAML syntax error", "found character '\\t' that cannot start any token"),
    ("yaml-control-char", "listeners:\x07\n",
     "1:11: YAML syntax error", "character '\\x07' is not allowed"),
    ("yaml-unknown-tag", L + "workers: !shell {app: echo}\n",
     "3:10: workers", "unsupported YAML tag '!shell'; write a plain mapping"),
    ("not-a-mapping", "- listeners\n- workers\n",
     "1:1: ", "expected a mapping, got ['listeners', 'workers']"),
    ("not-utf8", "listeners:\n  - {name: w\xe9b}\n",
     "2:13: ", "cannot read: not UTF-8 text (byte 0xe9)"),
]


def write_case(tmp_path: Path, text: str) -> Path:
    (tmp_path / "not-executable.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "not-executable.sh", 0o644)
    path = tmp_path / "bad.yaml"
    text = text.replace("{tmp}", str(tmp_path))
    if "\xe9" in text:
        path.write_bytes(text.encode("latin-1"))
    else:
        path.write_text(text)
    return path


def test_at_least_25_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 25
    assert len({c[2] for c in CASES}) >= 25


@pytest.mark.parametrize("text, where, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config(tmp_path, capsys, text, where, phrase):
    path = write_case(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config.load(str(path))
    first = e.value.problems[0]
    prefix = f"{path}:{where}" + ("" if where.endswith(" ") else ":")
    assert first.startswith(prefix), first
    assert phrase in first, first
    assert cli.main(["check", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == first
    assert err.splitlines()[-1] == f"{path}: {len(e.value.problems)} error(s)"


def test_every_error_is_printed_not_just_the_first(tmp_path, capsys):
    path = write_case(tmp_path, textwrap.dedent("""\
        listeners:
          - {name: web, port: 0}
        workers: {app: echo, count: 0, colour: red}
        drain: {signal: TREM, timeout: soon}
        """))
    assert cli.main(["check", "-c", str(path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(": ")[0:2] for ln in lines] == [
        [f"{path}:2:23", "listeners[0].port"],
        [f"{path}:3:29", "workers.count"],
        [f"{path}:3:32", "workers.colour"],
        [f"{path}:4:17", "drain.signal"],
        [f"{path}:4:32", "drain.timeout"],
        [f"{path}", "5 error(s)"],
    ]


@pytest.mark.parametrize("kind, message", [
    ("missing", "{p}: no such file"),
    ("directory", "{p}: is a directory, not a config file"),
    ("fifo", "{p}: is not a regular file"),
    ("empty", "{p}: the file is empty; it needs at least `listeners:`"),
    ("comments-only", "{p}: the file is empty; it needs at least `listeners:`"),
])
def test_whole_file_errors(tmp_path, capsys, kind, message):
    p = tmp_path / "c.yaml"
    if kind == "directory":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)  # opening it would block: check must not
    elif kind == "empty":
        p.write_text("")
    elif kind == "comments-only":
        p.write_text("# nothing here yet\n\n")
    assert cli.main(["check", "-c", str(p)]) == 1
    assert capsys.readouterr().err.splitlines()[0] == message.format(p=p)


def test_unreadable_file(tmp_path):
    p = tmp_path / "secret.yaml"
    p.write_text(L)
    p.chmod(0o600)
    tmp_path.chmod(0o755)
    # Root reads any file, so the reader is `nobody` when we are root.
    argv = [sys.executable, "-m", "upgraderd", "check", "-c", str(p)]
    if os.geteuid() == 0:
        argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]
        probe = subprocess.run([*argv[:4], sys.executable, "-c", "import upgraderd"],
                               capture_output=True, cwd=ROOT)
        if probe.returncode != 0:
            pytest.skip(f"nobody cannot run {sys.executable}: {probe.stderr.decode()[-200:]}")
    else:
        p.chmod(0)
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == f"{p}: cannot read: Permission denied"


@pytest.mark.parametrize("case", ["port-too-big", "unknown-signal", "command-not-executable",
                                  "yaml-unclosed-bracket", "no-such-user"])
def test_real_check_command(tmp_path, case):
    text, where, phrase = next(c[1:] for c in CASES if c[0] == case)
    path = write_case(tmp_path, text)
    r = subprocess.run([sys.executable, "-m", "upgraderd", "check", "-c", str(path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    assert r.stdout == ""
    first = r.stderr.splitlines()[0]
    assert first.startswith(f"{path}:{where}:") and phrase in first, first


def test_valid_config_passes_check(tmp_path):
    r = subprocess.run([sys.executable, "-m", "upgraderd", "check", "-c", "config/upgraderd.yaml"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "config/upgraderd.yaml: ok (1 listener(s), 4 worker(s))\n"
    assert r.stderr == ""


def test_relative_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "logs").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(L + "workers: {app: echo}\nlog: {file: logs/upgraderd.log}\npidfile: run.pid\n")
    monkeypatch.chdir("/")
    cfg = config.load(str(path))
    assert cfg.log.file == str(tmp_path / "logs" / "upgraderd.log")
    assert cfg.pidfile_path == str(tmp_path / "run.pid")
