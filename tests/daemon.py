"""Start the real upgraderd as a subprocess and watch it, for e2e tests and bench.

Waiting is always for a condition (a log line, a pid set, a process exit)
with a deadline, never a bare sleep. Every process started here is stopped by
its pid: the master, and any worker it leaves behind.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
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
    }
    cfg.update(sections)
    return cfg


class Daemon:
    """One upgraderd master run with a config written to `workdir`."""

    def __init__(self, workdir: Path, config: dict[str, object] | str, args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.config_path = workdir / "upgraderd.yaml"
        self.log_path = workdir / "upgraderd.log"
        self.write_config(config)
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen_workers: set[int] = set()
        self.log_offset = 0

    def write_config(self, config: dict[str, object] | str) -> None:
        """Write (or rewrite) the config file atomically."""
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    def start(self, wait: bool = True) -> Daemon:
        """Start the master; with `wait`, return once generation 1 is ACTIVE."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for var in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            env.pop(var, None)
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "upgraderd", "run", "-c", str(self.config_path), *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=ROOT,
                start_new_session=True)
        if wait:
            self.wait_log(r"serving: generation 1 ACTIVE", timeout=20)
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

    def settled(self) -> int:
        """Wait until no generation is STARTING; return the newest ACTIVE generation number."""
        def done() -> int | None:
            log = self.log()
            started = [int(n) for n in re.findall(r"generation (\d+) STARTING:", log)]
            settled = {int(n) for n in re.findall(r"generation (\d+) STARTING -> (?:ACTIVE|FAILED)", log)}
            # A queued HUP is acted on once the STARTING generation settles, in the same
            # pass but in a later log line: it is settled only once that line is there.
            queued = log.rfind("reload queued")
            acted = max(log.rfind(" STARTING: "), log.rfind("reload failed"))
            if started and all(n in settled for n in started) and queued < acted:
                active = [int(n) for n in re.findall(r"generation (\d+) STARTING -> ACTIVE", log)]
                return max(active) if active else None
            return None
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
