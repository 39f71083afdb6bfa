"""deploy/systemd: the units' commands do what they claim, and the hardening holds.

The ExecStartPre/ExecReload lines are taken from the unit file and run as they are,
with only what systemd would supply filled in: ${VAR} from Environment= and
RUNTIME_DIRECTORY, and the path of the `upgraderd` program (the test's venv).
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.fdstore import next_state
from tests.support.upgraderd_proc import ROOT, Daemon, echo_config, free_port

pytestmark = pytest.mark.e2e

UNITS = ROOT / "deploy" / "systemd"
FIXTURE = str(ROOT / "tests" / "fixtures" / "echo_worker.py")


def unit(name: str) -> dict[str, list[str]]:
    """Return a unit file's `Key=` values (each key may repeat), sections merged."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def command(unit_values: dict[str, list[str]], key: str, env: dict[str, str]) -> list[str]:
    """Return the argv of `key` (ExecReload, ...) as systemd would run it here."""
    variables = dict(v.split("=", 1) for v in unit_values.get("Environment", []))
    variables.update(env)
    line = re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], unit_values[key][0])
    argv = shlex.split(line)
    assert argv[0] == "/usr/local/bin/upgraderd", argv
    installed = Path(sys.executable).parent / "upgraderd"
    return ([str(installed)] if installed.exists() else [sys.executable, "-m", "upgraderd"]) + argv[1:]


def seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", text)
    assert m, text
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/",
                          stdin=subprocess.DEVNULL)


def test_exec_reload_fails_on_a_failing_release_and_exec_start_pre_checks(tmp_path):
    service = unit("upgraderd.service")
    port = free_port()
    good = echo_config(port, count=2)
    with Daemon(tmp_path, good).start() as d:
        env = {"UPGRADERD_CONFIG": str(d.config_path), "RUNTIME_DIRECTORY": str(tmp_path)}
        assert Path(env["RUNTIME_DIRECTORY"], "upgraderd.pid") == d.pidfile
        reload, check = command(service, "ExecReload", env), command(service, "ExecStartPre", env)

        broken = echo_config(port, count=2, ready={"timeout": "5s"})
        broken["workers"] = {"count": 2, "command": [sys.executable, FIXTURE, "--exit", "3"]}
        d.write_config(broken)
        assert run(check).returncode == 0  # a valid config: only its release is broken
        r = run(reload)
        assert r.returncode == 1, r
        assert r.stderr.startswith("upgraderd: reload failed: generation 2 did not become ACTIVE")

        d.write_config("listeners: [")
        r = run(check)
        assert r.returncode == 1 and f"{d.config_path}:1:13: YAML syntax error" in r.stderr, r
        r = run(reload)
        assert r.returncode == 1 and r.stderr.startswith("upgraderd: reload rejected"), r

        d.write_config(good)
        r = run(reload)
        assert (r.returncode, r.stdout) == (0, "reload done: generation 3 ACTIVE\n"), r


@pytest.mark.parametrize("name", ["upgraderd.service", "upgraderd-nonroot.service",
                                  "upgraderd-notify-reload.service"])
def test_exposure_is_at_most_3(name):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    r = subprocess.run([tool, "security", "--offline=yes", name], cwd=UNITS, capture_output=True,
                       text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    if m is None and "--offline" in r.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {r.stderr.strip()}")
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 3.0, r.stdout
    # The reasons for what stays open are written beside it.
    assert "What stays open" in (UNITS / name).read_text() or "Still open" in (UNITS / name).read_text()


def test_timeouts_follow_the_shipped_config():
    shipped = yaml.safe_load((ROOT / "config" / "upgraderd.yaml").read_text())
    drain, ready = seconds(shipped["drain"]["timeout"]), seconds(shipped["ready"]["timeout"])
    for name in ("upgraderd.service", "upgraderd-nonroot.service", "upgraderd-notify-reload.service"):
        u = unit(name)
        assert seconds(u["TimeoutStopSec"][0]) == drain + 15, name  # documented: drain.timeout + 15s
        assert seconds(u["TimeoutStartSec"][0]) > ready, name
        assert u["LimitNOFILE"] == ["65536"] and u["RuntimeDirectory"] == ["upgraderd"], name
        assert u["ExecStartPre"][0].startswith("/usr/local/bin/upgraderd check "), name
        if "ExecReload" in u:
            timeout = float(shlex.split(u["ExecReload"][0])[-1])
            assert timeout < seconds(u["TimeoutStartSec"][0]), name  # systemd's timeout bounds it
    assert unit("upgraderd-nonroot.service")["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert "User" not in unit("upgraderd.service") or unit("upgraderd.service")["User"] == ["root"]
    notify_reload = unit("upgraderd-notify-reload.service")
    assert notify_reload["Type"] == ["notify-reload"] and "ExecReload" not in notify_reload
    assert notify_reload["ReloadSignal"] == ["SIGHUP"]


def test_socket_unit_names_a_listener_of_the_shipped_config():
    shipped = yaml.safe_load((ROOT / "config" / "upgraderd.yaml").read_text())
    sock = unit("upgraderd.socket")
    listener = next(x for x in shipped["listeners"] if x["name"] == sock["FileDescriptorName"][0])
    assert sock["ListenStream"] == [f"{listener['host']}:{listener['port']}"]
    assert sock["Service"] == ["upgraderd.service"]
    assert sock["Backlog"] == [str(listener["backlog"])]



def test_what_type_notify_reload_sees_for_a_good_and_a_failed_reload(tmp_path):
    """RELOADING=1 with a current MONOTONIC_USEC, then READY=1, also when the reload failed."""
    path = str(tmp_path / "notify.sock")
    port = free_port()
    cfg = echo_config(port, count=1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(path)
        systemd.settimeout(20)
        with Daemon(tmp_path, cfg, env={"NOTIFY_SOCKET": path}).start() as d:
            assert next_state(systemd)["READY"] == "1"
            for config, status in ((cfg, "generation 2 active"), ("listeners: [", "reload failed")):
                d.write_config(config)
                before = time.monotonic()
                d.send(signal.SIGHUP)
                reloading = next_state(systemd)
                assert reloading["RELOADING"] == "1"
                # systemd (253+) ignores a RELOADING=1 whose MONOTONIC_USEC is not current.
                assert before * 1e6 <= int(reloading["MONOTONIC_USEC"]) <= time.monotonic() * 1e6
                assert next_state(systemd) == {"READY": "1", "STATUS": status}
