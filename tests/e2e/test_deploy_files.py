"""deploy/: shell completions, the logrotate snippet and the sysctl.d drop-in, each run for real."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.upgraderd_proc import ROOT, Daemon, echo_config, free_port, wait_until
from upgraderd.service import cli

pytestmark = pytest.mark.e2e

DEPLOY = ROOT / "deploy"
BASH = DEPLOY / "completions" / "upgraderd.bash"
ZSH = DEPLOY / "completions" / "_upgraderd"


def _commands() -> dict[str, set[str]]:
    """Return each subcommand of the real parser with its option strings."""
    sub = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}


def _bash_complete(*words: str) -> list[str]:
    """Return what bash offers for the last of `words` (the word being typed)."""
    quoted = " ".join(f"'{w}'" for w in words)
    script = (f"source {BASH}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; "
              "_upgraderd; printf '%s\\n' \"${COMPREPLY[@]}\"")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, check=True)
    return [w for w in out.stdout.splitlines() if w]


def test_completions_parse():
    subprocess.run(["bash", "-n", str(BASH)], check=True, timeout=30)
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed (Debian package zsh): only the bash file was parsed")
    subprocess.run([zsh, "-n", str(ZSH)], check=True, timeout=30)


def test_bash_completion_knows_every_command_and_option():
    commands = _commands()
    assert set(_bash_complete("upgraderd", "")) == set(commands) | {"--help", "--version"}
    for name, options in commands.items():
        offered = set(_bash_complete("upgraderd", name, "-"))
        assert options - {"-h"} <= offered, (name, options - offered)
    zsh_text = ZSH.read_text()
    for name, options in commands.items():
        assert f"'{name}:" in zsh_text, name
        assert all(o in zsh_text for o in options - {"-h", "--help"}), name


def test_logrotate_snippet_rotates_and_the_master_reopens(tmp_path):
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    if not Path(logrotate).exists():
        pytest.skip("logrotate is not installed (Debian package logrotate)")
    port = free_port()
    logs = tmp_path / "log"
    logs.mkdir(mode=0o755)
    log = logs / "master.log"
    with Daemon(tmp_path, echo_config(port, count=1, log={"file": str(log)})).start(wait=False) as d:
        wait_until(lambda: log.exists() and "serving: generation 1 ACTIVE" in log.read_text(), 20,
                   "generation 1 in the log file")
        wait_until(lambda: d.pidfile.exists(), 10, "the pidfile")
        installed = Path(sys.executable).parent / "upgraderd"
        assert installed.exists(), installed
        # The snippet as shipped, with only the paths of this test swapped in.
        conf = (DEPLOY / "logrotate" / "upgraderd").read_text() \
            .replace("/var/log/upgraderd/", f"{logs}/") \
            .replace("/run/upgraderd/upgraderd.pid", str(d.pidfile)) \
            .replace("/usr/local/bin/upgraderd", str(installed))
        (tmp_path / "logrotate.conf").write_text(conf)
        r = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(tmp_path / "logrotate.conf")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "serving: generation 1 ACTIVE" in (logs / "master.log.1").read_text()
        wait_until(lambda: log.exists() and "reopened the log file (SIGUSR1)" in log.read_text(), 15,
                   "the master to write to a new file")


def test_sysctl_drop_in_sets_tcp_migrate_req_in_a_new_network_namespace():
    unshare, sysctl = shutil.which("unshare"), shutil.which("sysctl") or "/usr/sbin/sysctl"
    if unshare is None or not Path(sysctl).exists():
        pytest.skip("unshare (util-linux) or sysctl (procps) is missing")
    conf = DEPLOY / "sysctl.d" / "90-upgraderd.conf"
    # A namespace of its own: the host's setting is never touched.
    r = subprocess.run([unshare, "--net", "sh", "-c",
                        f"cat /proc/sys/net/ipv4/tcp_migrate_req; {sysctl} -q -p {conf} && "
                        "cat /proc/sys/net/ipv4/tcp_migrate_req"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0 and "Operation not permitted" in r.stderr:
        pytest.skip(f"cannot create a network namespace here: {r.stderr.strip()}")
    assert (r.returncode, r.stdout) == (0, "0\n1\n"), r
