"""Start the real upgraderd as a subprocess and watch it, for e2e tests and bench.

Waiting is always for a condition (a log line, a pid set, a process exit)
with a deadline, never a bare sleep. Every process started here is stopped by
its pid: the master, and any worker it leaves behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from tests.support import ROOT


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    # The config rejects port 0, so take one the kernel hands out and let it go:
    # the master binds with SO_REUSEADDR and SO_REUSEPORT.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> set[int]:
    """Return the pids whose parent is `pid` (read from /proc)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry))
    return out


def alive(pid: int) -> bool:
    """Return True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def stop_after_restart(orphans: Iterable[int], first: "Daemon", successor: "Daemon | None") -> None:
    """Clean up after a master-restart test: SIGKILL the orphans still alive, stop the successor, then the first master."""
    for pid in orphans:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    if successor is not None:
        successor.stop()
    first.stop()


def _signal_pending(pid: int, sig: int) -> bool:
    """Return True if `sig` was sent to `pid` but not yet delivered."""
    try:
        with open(f"/proc/{pid}/status") as f:
            masks = [int(ln.split()[1], 16) for ln in f if ln.startswith(("SigPnd:", "ShdPnd:"))]
    except OSError:
        return False
    return any(m & (1 << (sig - 1)) for m in masks)


def text_of(path: Path) -> str | None:
    """Return the file's text, or None while it does not exist (a condition for wait_until)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def wait_until(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    """Poll `cond` until it returns something truthy; fail the test after `timeout`."""
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def echo_config(port: int, mode: str = "reuseport", count: int = 4, **sections: object) -> dict[str, object]:
    """Return a config dict for the built-in echo app on 127.0.0.1:port."""
    cfg: dict[str, object] = {
        "listeners": [{"name": "echo", "host": "127.0.0.1", "port": port, "mode": mode}],
        "workers": {"count": count, "app": "echo"},
        "ready": {"timeout": "10s"},
        "drain": {"timeout": "10s"},
        # The metrics endpoint is on by default; parallel tests must not share its port.
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
    }
    cfg.update(sections)
    return cfg


def http_config(port: int, mp_dir: Path | str, count: int = 2) -> dict[str, object]:
    """Return a config dict for the built-in http app on 127.0.0.1:port, metrics files in `mp_dir`."""
    cfg = echo_config(port, count=count)
    cfg["listeners"] = [{"name": "web", "host": "127.0.0.1", "port": port}]
    cfg["workers"] = {"count": count, "app": "http"}
    cfg["metrics"]["dir"] = str(mp_dir)  # type: ignore[index]
    return cfg


def _is_config_without_metrics(text: str) -> bool:
    """Return True for a well-formed config mapping with no `metrics` key (not a broken one)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(doc, dict) and "listeners" in doc and "metrics" not in doc


class Daemon:
    """One upgraderd master run with a config written to `workdir`."""

    def __init__(self, workdir: Path, config: dict[str, object] | str, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, wrap: tuple[str, ...] = (),
                 pass_fds: tuple[int, ...] = (), cwd: Path = ROOT, new_session: bool = True) -> None:
        """`wrap` prefixes the command (e.g. `prlimit`, `unshare`); it must exec the master in place.

        `pass_fds` are fds of ours the wrap command gets (e.g. sockets to socket-activate with).
        `cwd` is the master's working directory, which `python -m upgraderd` puts first on sys.path.
        `new_session`: the master runs in a session of its own, as a daemon does (setsid).
        """
        self.new_session = new_session
        self.extra_env = env or {}
        self.cwd = cwd
        self.wrap = wrap
        self.pass_fds = pass_fds
        self.workdir = workdir
        self.config_path = workdir / "upgraderd.yaml"
        self.log_path = workdir / "upgraderd.log"
        # Never the default pidfile: tests run in parallel, and /run/upgraderd.pid is the host's.
        self.pidfile = workdir / "upgraderd.pid"
        self.write_config(config)
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen_workers: set[int] = set()
        self.log_offset = 0

    def write_config(self, config: dict[str, object] | str) -> None:
        """Write (or rewrite) the config file atomically.

        A config that says nothing of `metrics` gets a free port for it: the default,
        127.0.0.1:9108, would be shared by tests running at the same time.
        """
        if isinstance(config, dict) and "metrics" not in config:
            config = {**config, "metrics": {"listen": f"127.0.0.1:{free_port()}"}}
        if isinstance(config, str) and _is_config_without_metrics(config):
            config += f"\nmetrics: {{listen: '127.0.0.1:{free_port()}'}}\n"
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    def start(self, wait: bool = True) -> Daemon:
        """Start the master; with `wait`, return once generation 1 is ACTIVE."""
        # TMPDIR: the master's private metrics directory lands in the test's workdir,
        # so even a master killed with SIGKILL leaves nothing behind in /tmp.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(self.workdir)}
        for var in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            env.pop(var, None)
        env.update(self.extra_env)
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrap, sys.executable, "-m", "upgraderd", "run", "-c", str(self.config_path),
                 *(() if "--pidfile" in self.args else ("--pidfile", str(self.pidfile))), *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=self.cwd,
                start_new_session=self.new_session, pass_fds=self.pass_fds)
        if wait:
            try:
                self.wait_log(r"serving: generation 1 ACTIVE", timeout=20)
            except BaseException:
                # `with Daemon(...).start() as d` never reaches __exit__ when start() raises:
                # stop the master here, or it outlives the test (and loads the next ones).
                self.stop()
                raise
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        """Return what this run of the master has logged so far."""
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 20.0) -> list[re.Match[str]]:
        """Wait until `pattern` matches at least `count` times in the log."""
        rx = re.compile(pattern)

        def found() -> list[re.Match[str]] | None:
            if self.proc is not None and self.proc.poll() is not None and len(rx.findall(self.log())) < count:
                raise AssertionError(f"master exited ({self.proc.returncode}) before {pattern!r}:\n{self.log()}")
            matches = list(rx.finditer(self.log()))
            return matches if len(matches) >= count else None
        try:
            return wait_until(found, timeout, f"{count} x {pattern!r}")  # type: ignore[return-value]
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- log ---\n{self.log()[-6000:]}") from None

    def send(self, sig: int) -> None:
        """Send `sig` to the master."""
        os.kill(self.pid, sig)

    def workers(self) -> set[int]:
        """Return the master's live child pids (and remember them for cleanup)."""
        pids = children(self.pid)
        self.seen_workers |= pids
        return pids

    def wait_workers(self, count: int, none_of: set[int] | frozenset[int] = frozenset(), timeout: float = 15) -> set[int]:
        """Wait until the master has exactly `count` children and none of `none_of`; return them."""
        def ready() -> set[int] | None:
            pids = self.workers()
            return pids if len(pids) == count and not pids & none_of else None
        return wait_until(ready, timeout, f"{count} workers, none of {sorted(none_of)}")  # type: ignore[return-value]

    def reload_to(self, generation: int) -> None:
        """Send SIGHUP and wait until generation `generation` is ACTIVE."""
        self.send(signal.SIGHUP)
        self.wait_log(rf"reload done: generation {generation} ACTIVE")

    def hup(self) -> None:
        """Send SIGHUP and wait until the master has logged receiving it."""
        n = self.log().count("received SIGHUP")
        self.send(signal.SIGHUP)
        wait_until(lambda: self.log().count("received SIGHUP") > n, 20, "the master to receive SIGHUP")

    def status(self) -> dict[str, Any] | None:
        """Return the master's status document (see upgraderd/service/status.py), if written yet."""
        try:
            return json.loads(Path(f"{self.pidfile}.status.json").read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def settled(self) -> int:
        """Wait until every HUP sent so far is acted on and no generation is STARTING.

        Return the newest ACTIVE generation number. Read from the status file,
        which the master replaces atomically after a loop pass: the log can be
        caught between two lines of one pass (a generation ACTIVE, the queued
        reload not yet logged).
        """
        def done() -> int | None:
            st = self.status()
            if st is None or st["pid"] != self.pid or _signal_pending(self.pid, signal.SIGHUP):
                return None
            # The master logs a HUP in the pass that takes it and writes the status file at the
            # end of that pass: a file older than the last "received SIGHUP" line is not the answer.
            if st["hups"] < len(re.findall(rf"upgraderd\[{self.pid}\] \w+ received SIGHUP", self.log())):
                return None
            if any(g["state"] == "STARTING" for g in st["generations"]):
                return None
            if st["last_reload"]["covers"] != st["hups"]:
                return None  # a HUP came in after the last reload started: another is due
            active = [g["number"] for g in st["generations"] if g["state"] == "ACTIVE"]
            return max(active) if active else None
        return wait_until(done, 30, "every generation to settle")  # type: ignore[return-value]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop the master with `sig`, wait for it, and kill any worker left behind."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.workers()
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.seen_workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        return self.proc.returncode

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
