"""The README's "Try it" typed into a real interactive bash, under a pseudo-terminal.

An interactive shell runs `upgraderd run &` as a job in a process group of
its own, and `kill -HUP %1` signals that whole group. The workers, templates
and standby live in process groups of their own (system/process.py), so
only the master sees the HUP: it rolls generation 2 and nothing is lost. The
terminal hanging up makes bash send SIGHUP to its jobs again: another
reload. Every worker is stopped by the master on `kill -TERM %1`.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT
from tests.support.loadgen import Load
from tests.support.persistent import Streams
from tests.support.upgraderd_proc import alive, children, free_port, wait_until

pytestmark = pytest.mark.e2e


class Terminal:
    """An interactive bash on a pty; what it prints is read (and kept) by a thread."""

    def __init__(self, cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "LISTEN_"))}
        env.update(TERM="dumb", PS1="$ ", HISTFILE="/dev/null")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a session leader with the pty as its terminal
            os.chdir(cwd)
            os.execvpe("bash", ["bash", "--norc", "--noprofile", "-i"], env)
        self.output = bytearray()
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # Never blocked in read() for long: a read in progress holds the pty open,
        # and hang_up() must be the last close.
        while not self._closing.is_set():
            if not select.select([self.fd], [], [], 0.05)[0]:
                continue
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:   # EIO once bash is gone
                return
            if not chunk:
                return
            self.output += chunk

    def type(self, line: str) -> None:
        """Type `line` and Enter."""
        os.write(self.fd, line.encode() + b"\n")

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match[bytes]:
        """Wait until the terminal shows `pattern`."""
        rx = re.compile(pattern.encode())
        try:
            return wait_until(lambda: rx.search(bytes(self.output)), timeout,  # type: ignore[return-value]
                              f"{pattern!r} on the terminal")
        except AssertionError as e:
            raise AssertionError(f"{e}; it shows {bytes(self.output)[-500:]!r}") from None

    def hang_up(self) -> None:
        """Close the terminal, as a closed ssh session or xterm does: bash gets SIGHUP."""
        self._closing.set()
        self._reader.join()
        os.close(self.fd)

    def kill(self) -> None:
        if alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def pgid(pid: int) -> int:
    """Return the process group of `pid`, read from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[2])


def try_it() -> list[str]:
    """Return the commands of the README's "Try it" block, without their comments."""
    block = (ROOT / "README.md").read_text().split("## Try it", 1)[1].split("```sh\n", 1)[1]
    return [line.split("  #")[0].strip() for line in block.split("```", 1)[0].splitlines()]


def test_try_it_kill_hup_job_from_interactive_bash_loses_nothing(tmp_path: Path) -> None:
    start, echo, hup, stop = try_it()
    assert (start, hup, stop) == ("scripts/run &", "kill -HUP %1", "kill -TERM %1")
    port = free_port()
    cfg = yaml.safe_load((ROOT / "config" / "upgraderd.yaml").read_text())
    cfg["listeners"][0]["port"] = port
    cfg["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
    cfg["pidfile"] = str(tmp_path / "upgraderd.pid")
    (tmp_path / "upgraderd.yaml").write_text(yaml.safe_dump(cfg))
    log = tmp_path / "upgraderd.log"
    upgraderd = Path(sys.executable).parent / "upgraderd"

    def logged(pattern: str) -> object:
        return wait_until(lambda: re.search(pattern, log.read_text() if log.exists() else ""), 30,
                          f"{pattern!r} in the log")

    term = Terminal(ROOT)
    master = 0
    seen: set[int] = set()
    try:
        term.type(f"{upgraderd} run -c {tmp_path}/upgraderd.yaml 2>{log} &")
        term.type("echo master=$!")
        master = int(term.wait_for(r"master=(\d+)").group(1))
        logged(r"serving: generation 1 ACTIVE")
        seen |= children(master)
        assert seen and all(pgid(p) != pgid(master) for p in seen), "a worker shares the master's group"
        term.type(echo.replace("8090", str(port)))            # a client a fresh Debian has: bash
        term.wait_for(r"\nhello\r?\n")
        streams = Streams(port, 8).start()
        load = Load("127.0.0.1", port, threads=2, max_seconds=60).start("echo")
        try:
            assert streams.wait_ok(40) and load.wait_for_ok(40)
            term.type(hup)                                     # the README's line, as typed
            logged(r"reload done: generation 2 ACTIVE")
            logged(r"generation 1 DRAINING -> RETIRED")
            seen |= children(master)
            term.hang_up()                                     # bash passes SIGHUP on to its job
            logged(r"reload done: generation 3 ACTIVE")
            logged(r"generation 2 DRAINING -> RETIRED")
            seen |= children(master)
            ok = streams.result.ok
            assert streams.wait_ok(ok + 40)
        finally:
            stream_result, load_result = streams.stop(), load.stop()
        assert stream_result.failures == {}, stream_result.examples
        assert stream_result.ports_kept
        assert load_result.failures == {}, load_result.examples
        assert "killed by SIGHUP" not in log.read_text()
        assert alive(master)
        os.kill(master, signal.SIGTERM)                        # the README's `stop`; bash is gone
        wait_until(lambda: not alive(master), 30, "the master to exit")
        assert "upgraderd stopped" in log.read_text()
        left = sorted(p for p in seen if alive(p))
        assert left == [], f"left behind: {left}"
        # A clean stop leaves no pidfile, lock or status file behind.
        assert sorted(p.name for p in tmp_path.glob("upgraderd.pid*")) == []
        # Every line, the workers' own ("handed N of M connection(s)") included, has the daemon's format.
        lines = log.read_text().splitlines()
        assert any("handed" in line for line in lines)
        odd = [line for line in lines if not re.match(r"\d{4}-\d\d-\d\dT\S+ upgraderd\[\d+\] [A-Z]+ ", line)]
        assert odd == [], odd
    finally:
        for pid in [master, *seen]:
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
        term.kill()
