"""Prefork templates: workers forked from one exec'd template per generation.

Each test runs the real master with `workers.prefork` or a `module:factory`
app, real sockets on 127.0.0.1 and real signals. Templates and workers are
told apart by /proc/PID/comm, which the template sets for both.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.support.loadgen import Load
from tests.support.scrape import scrape, value
from tests.support.upgraderd_proc import Daemon, alive, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e

# A user's app on the worker library. At start each worker records, in a file
# named by its pid, the code version it runs, whether LISTEN_PID is its own pid
# and the port of its fd 3, then echoes "<version> <pid>" for every read.
APP = '''
import os
import socket
from upgraderd import worker
from upgraderd.apps import server

VERSION = {version!r}
{extra}

class Tag:
    def received(self, data):
        return f"{{VERSION}} {{os.getpid()}}\\n".encode()
    def closing(self):
        return False
    def idle(self):
        return True
    def drain(self):
        pass


def make():
    own = os.environ.get("LISTEN_PID") == str(os.getpid())
    port = socket.socket(fileno=os.dup(3)).getsockname()[1]
    with open(os.path.join({out!r}, f"ran.{{os.getpid()}}"), "w") as f:
        f.write(f"{{VERSION}} {{own}} {{port}} {{os.getppid()}} {{os.environ['UPGRADERD_GENERATION']}}")
    return server.Server(worker.listeners(), lambda name: Tag())
'''


def write_app(where: Path, version: str, extra: str = "") -> None:
    """Write app module `tagapp` (the length changes with `version`, so no stale .pyc is used)."""
    (where / "tagapp.py").write_text(APP.format(version=version, extra=extra, out=str(where / "out")))


def app_config(port: int, where: Path, count: int = 2) -> dict[str, object]:
    """Return a config running `tagapp:make` from `where`."""
    return echo_config(port, count=count, workers={
        "count": count, "app": "tagapp:make", "cwd": str(where),
        "env": {"PYTHONDONTWRITEBYTECODE": "1"}})


def comm(pid: int) -> str:
    """Return /proc/PID/comm ('' if gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def forked(d: Daemon) -> set[int]:
    """Return the master's children that are forked workers."""
    return {p for p in d.workers() if comm(p) == "upgraderd-work"}


def templates(d: Daemon) -> set[int]:
    """Return the master's children that are templates."""
    return {p for p in d.workers() if comm(p) == "upgraderd-tmpl"}


def ran(where: Path) -> dict[int, list[str]]:
    """Return what each worker recorded at start, by pid."""
    out = {}
    for f in (where / "out").glob("ran.*"):
        fields = f.read_text().split()
        if len(fields) == 5:
            out[int(f.name.split(".")[1])] = fields
    return out


def ask(port: int) -> str:
    """Make one round trip to the tag app; return its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"?")
        return s.recv(100).decode()


class Asker:
    """Round trips to the tag app in a thread, new connection each, until stopped; count outcomes."""

    def __init__(self, port: int, max_seconds: float = 60.0) -> None:
        self.port, self.end = port, time.monotonic() + max_seconds
        self.ok, self.failures, self.versions = 0, [], set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set() and time.monotonic() < self.end:
            try:
                answer = ask(self.port)
            except OSError as e:
                self.failures.append(repr(e))
                continue
            if not answer:
                self.failures.append("empty answer")
                continue
            self.ok += 1
            self.versions.add(answer.split()[0])

    def wait_for_ok(self, n: int) -> None:
        """Wait until `n` round trips succeeded in total."""
        wait_until(lambda: self.ok >= n, 20, f"{n} round trips")

    def stop(self) -> list[str]:
        """Stop and return the failures."""
        self.stopped.set()
        self.thread.join(15)
        return self.failures


def test_fifty_hups_under_load_lose_nothing_with_templates(tmp_path):
    port = free_port()
    cfg = echo_config(port, workers={"count": 4, "app": "echo", "prefork": True})
    with Daemon(tmp_path, cfg).start() as d:
        first = forked(d)
        assert len(first) == 4 and len(templates(d)) == 1
        load = Load("127.0.0.1", port, threads=6, max_seconds=120).start("echo")
        assert load.wait_for_ok(200)
        for _ in range(50):
            d.hup()
            time.sleep(0.1)  # the HUP rate under test, not a wait for a condition
        final = d.settled()
        assert load.wait_for_ok(load.result.ok + 200)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        log = d.log()
        assert "FAILED" not in log and "SIGKILL" not in log
        wait_until(lambda: all(f"generation {n} DRAINING -> RETIRED" in d.log() for n in range(1, final)),
                   10, "every old generation to retire")
        # One template per generation, each stopped once its generation left ACTIVE.
        wait_until(lambda: len(templates(d)) == 1 and len(forked(d)) == 4, 10, "one template, 4 workers")
        assert len(re.findall(r"template pid \d+ started", log)) == final
        assert not forked(d) & first
        took = sorted(float(x) for x in re.findall(r"ACTIVE ([0-9.]+)s after HUP", log))
        print(f"\nprefork: {result.ok} round trips, {final - 1} reloads, "
              f"HUP->ACTIVE p50 {took[len(took) // 2]:.3f}s max {took[-1]:.3f}s")


def test_respawn_forks_from_its_own_template_never_newer_code(tmp_path):
    (tmp_path / "out").mkdir()
    write_app(tmp_path, "v1")
    port = free_port()
    with Daemon(tmp_path, app_config(port, tmp_path)).start() as d:
        gen1 = forked(d)
        assert len(gen1) == 2 and ask(port).startswith("v1 ")
        (template1,) = templates(d)
        # Each worker: its own LISTEN_PID, the listener at fd 3, re-parented to the master.
        assert {p: r for p, r in ran(tmp_path).items()} == {p: ["v1", "True", str(port), str(d.pid), "1"]
                                                             for p in gen1}
        write_app(tmp_path, "version-two")   # on disk, not yet reloaded
        victim = min(gen1)
        os.kill(victim, signal.SIGKILL)
        d.wait_log(rf"generation 1 slot \d: worker died \(pid {victim} killed by SIGKILL\)")
        respawned = wait_until(lambda: (forked(d) - gen1) or None, 10, "the respawn")
        (new,) = respawned
        wait_until(lambda: new in ran(tmp_path), 10, "the respawn to record its start")
        assert ran(tmp_path)[new] == ["v1", "True", str(port), str(d.pid), "1"]
        assert templates(d) == {template1}   # no new exec for a respawn
        assert d.log().count("template pid") == 1
        d.hup()
        d.wait_log(r"generation 2 STARTING -> ACTIVE")
        def gen2_alone() -> set[int] | None:
            now = forked(d)
            return now if len(now) == 2 and not now & (gen1 | respawned) else None
        gen2 = wait_until(gen2_alone, 10, "generation 2 alone")
        assert {p: ran(tmp_path)[p][0] for p in gen2} == {p: "version-two" for p in gen2}
        assert ask(port).startswith("version-two ")
        wait_until(lambda: templates(d) and template1 not in templates(d), 10, "template 1 to go")
        assert not alive(template1)


@pytest.mark.parametrize("how,reason", [
    ("raise ImportError('broken release')", r"exit code 3: cannot load 'tagapp:make': ImportError: broken release"),
    ("os.kill(os.getpid(), 9)", r"killed by SIGKILL"),
])
def test_template_that_dies_at_start_fails_the_reload_cleanly(tmp_path, how, reason):
    (tmp_path / "out").mkdir()
    write_app(tmp_path, "v1")
    port = free_port()
    cfg = app_config(port, tmp_path)
    with Daemon(tmp_path, cfg).start() as d:
        gen1 = forked(d)
        load = Asker(port)
        load.wait_for_ok(50)
        write_app(tmp_path, "bad-version", extra=how)
        d.hup()
        d.wait_log(rf"generation 2 failed: template pid \d+ {reason}; the serving generation is untouched")
        assert forked(d) == gen1 and all(alive(p) for p in gen1)
        load.wait_for_ok(load.ok + 50)
        assert load.versions == {"v1"}
        assert value(scrape(cfg), "upgraderd_reloads_total", result="failed") == 1
        write_app(tmp_path, "v3")
        d.hup()
        d.wait_log(r"generation 3 STARTING -> ACTIVE")
        # An old worker may still answer what was queued on its slot socket as it drained.
        d.wait_log(r"generation 1 DRAINING -> RETIRED")
        assert load.stop() == []
        assert ask(port).startswith("v3 ")


def test_forked_workers_count_their_connections(tmp_path):
    port = free_port()
    cfg = echo_config(port, workers={"count": 2, "app": "echo", "prefork": True})
    with Daemon(tmp_path, cfg).start() as d:
        for i in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"x%d" % i)
                assert s.recv(10) == b"x%d" % i

        def accepted() -> float:
            return value(scrape(cfg), "upgraderd_connections_accepted_total", listener="echo")
        wait_until(lambda: accepted() == 20, 10, "20 accepted connections")
        d.hup()
        wait_until(lambda: "generation 1 DRAINING -> RETIRED" in d.log(), 10, "generation 1 to retire")
        assert accepted() == 20   # the retired workers' counts were folded, not lost or doubled


def test_a_warm_standby_never_serves_stale_app_code(tmp_path):
    (tmp_path / "out").mkdir()
    write_app(tmp_path, "v1")
    port = free_port()
    cfg = app_config(port, tmp_path)
    cfg["workers"]["warm"] = True
    with Daemon(tmp_path, cfg).start() as d:
        gen1 = forked(d)
        wait_until(lambda: len(templates(d)) == 2, 20, "a standby next to generation 1's template")
        # After the standby started: a new release, with a module that did not exist before.
        (tmp_path / "fresh_helper.py").write_text("TAG = 'helper-2'\n")
        write_app(tmp_path, "version-two", extra="from fresh_helper import TAG\nVERSION = VERSION + TAG")
        d.hup()
        d.wait_log(r"generation 2 STARTING -> ACTIVE")
        assert re.search(r"generation 2: template pid \d+ started \(warm standby\)", d.log())
        wait_until(lambda: not forked(d) & gen1 and len(forked(d)) == 2, 10, "generation 2 alone")
        assert {ran(tmp_path)[p][0] for p in forked(d)} == {"version-twohelper-2"}
        assert ask(port).startswith("version-twohelper-2 ")
        samples = scrape(cfg)
        assert value(samples, "upgraderd_templates_started_total", kind="cold") == 1
        assert value(samples, "upgraderd_templates_started_total", kind="warm") == 1


def socket_fds(pid: int) -> int:
    """Return how many sockets `pid` holds open."""
    fd_dir = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fd_dir.iterdir() if os.readlink(fd).startswith("socket:"))


def test_the_template_holds_no_listener_and_dies_with_the_master(tmp_path):
    port = free_port()
    # A short orphan grace: orphans of a dead master serve on that long, then drain.
    cfg = echo_config(port, workers={"count": 2, "app": "echo", "prefork": True, "warm": True},
                      drain={"orphan_grace": "1s"})
    d = Daemon(tmp_path, cfg).start()
    try:
        workers = forked(d)
        wait_until(lambda: len(templates(d)) == 2, 20, "the template and a standby")
        tmpl = templates(d)
        # A template keeps only its control channel: every listener went to the workers.
        assert {p: socket_fds(p) for p in tmpl} == {p: 1 for p in tmpl}
        d.proc.kill()   # SIGKILL: no drain, no clean-up by the master
        d.proc.wait(10)
        wait_until(lambda: not any(alive(p) for p in tmpl), 10, "the templates to die with the master")
        # Workers notice that their parent is gone, serve on for the grace, then drain (no clients: exit).
        wait_until(lambda: not any(alive(p) for p in workers), 10, "the orphaned workers to drain")
    finally:
        d.stop()


def get(sock: socket.socket) -> tuple[str, str]:
    """Send one keep-alive GET on `sock`; return (its Connection header, its body)."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "connection closed before the answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "connection closed in the body"
        body += chunk
    return re.search(rb"Connection: (\S+)", head).group(1).decode(), body.decode()  # type: ignore[union-attr]


def test_keep_alive_connections_move_to_generations_forked_from_a_warm_standby(tmp_path):
    """A standby's workers must pass the hand-off check (their generation as /proc shows it)."""
    port = free_port()
    cfg = echo_config(port, count=2, workers={"count": 2, "app": "http", "prefork": True, "warm": True})
    cfg["listeners"] = [{"name": "web", "host": "127.0.0.1", "port": port}]
    with Daemon(tmp_path, cfg).start() as d:
        conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        try:
            assert {get(c)[1].split()[0] for c in conns} == {"generation=1"}
            for gen in (2, 3):
                wait_until(lambda: len(templates(d)) == 2, 20, f"a standby for generation {gen}")
                d.hup()
                d.wait_log(rf"generation {gen - 1} DRAINING -> RETIRED")
                assert re.search(rf"generation {gen}: template pid \d+ started \(warm standby\)", d.log())
                # The same connections, answered by the new generation, and kept open.
                answers = [get(c) for c in conns]
                assert {(h, b.split()[0]) for h, b in answers} == {("keep-alive", f"generation={gen}")}, answers
        finally:
            for c in conns:
                c.close()
        assert "handed 0 of" not in d.log()
