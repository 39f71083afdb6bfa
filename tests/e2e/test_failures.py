"""A broken new generation, a crashed worker, stops and restarts: the service keeps its promises."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time

import pytest

from tests.support import ROOT
from tests.support.loadgen import Load
from tests.support.scrape import scrape, value
from tests.support.upgraderd_proc import Daemon, alive, echo_config, free_port, wait_until
from upgraderd.contract import notify

pytestmark = pytest.mark.e2e

FIXTURE = str(ROOT / "tests" / "fixtures" / "echo_worker.py")


def fixture_config(port: int, *args: str, **sections: object) -> dict[str, object]:
    cfg = echo_config(port, **sections)
    cfg["workers"] = {"count": 4, "command": [sys.executable, FIXTURE, *args]}
    return cfg


@pytest.mark.parametrize("args, why", [
    (("--exit", "3"), r"exited at start-up: exit code 3"),
    (("--no-ready",), r"not ready within 2s \(slots 0, 1, 2, 3 never sent READY=1\)"),
])
def test_failed_generation_leaves_old_one_serving(tmp_path, args, why):
    port = free_port()
    with Daemon(tmp_path, echo_config(port)).start() as d:
        gen1 = d.workers()
        load = Load("127.0.0.1", port, threads=4, max_seconds=60).start("echo")
        assert load.wait_for_ok(100)
        d.write_config(fixture_config(port, *args, ready={"timeout": "2s"}))
        d.send(signal.SIGHUP)
        d.wait_log(r"reload failed, still serving generation 1")
        d.wait_log(why)
        # The failed generation's workers go away; generation 1 is untouched.
        wait_until(lambda: d.workers() == gen1, 15, "only generation 1's workers to remain")
        assert load.wait_for_ok(load.result.ok + 200)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        assert "generation 1 ACTIVE -> DRAINING" not in d.log()
        # Fix the config: the next HUP brings up generation 3.
        d.write_config(echo_config(port))
        d.send(signal.SIGHUP)
        d.wait_log(r"reload done: generation 3 ACTIVE")


REJECTED = "upgraderd_notify_rejected_total"


def test_garbage_notify_is_counted_and_generation_fails(tmp_path):
    port = free_port()
    cfg = echo_config(port)
    with Daemon(tmp_path, cfg).start() as d:
        gen1 = d.workers()
        assert value(scrape(cfg), REJECTED) == 0
        load = Load("127.0.0.1", port, threads=4, max_seconds=60).start("echo")
        assert load.wait_for_ok(100)
        # The same metrics address in the new config: the endpoint scraped below stays put.
        d.write_config(fixture_config(port, "--garbage", ready={"timeout": "3s"}, metrics=cfg["metrics"]))
        d.send(signal.SIGHUP)
        d.wait_log(r"ignored bad notify message from pid (\d+)")
        d.wait_log(r"reload failed, still serving generation 1")
        wait_until(lambda: d.workers() == gen1, 15, "only generation 1's workers to remain")
        # Each of generation 2's four workers sent one malformed datagram, and nothing else did:
        # all four are counted, and the warnings are rate-limited to one line for the burst.
        wait_until(lambda: value(scrape(cfg), REJECTED) == 4, 10, "4 rejected notify messages")
        assert len(re.findall(r"ignored bad notify message from pid \d+", d.log())) == 1
        assert d.settled() == 1
        assert load.wait_for_ok(load.result.ok + 200)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        assert d.proc.poll() is None


def test_crashed_worker_is_respawned_into_its_slot(tmp_path):
    port = free_port()
    with Daemon(tmp_path, echo_config(port)).start() as d:
        before = d.workers()
        load = Load("127.0.0.1", port, threads=4, max_seconds=60).start("echo")
        assert load.wait_for_ok(100)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        d.wait_log(rf"pid {victim} killed by SIGKILL\); respawning in 0.10s")
        m = d.wait_log(r"generation 1 slot (\d+): respawning(?:\n|$)")[0]
        def refilled() -> set[int] | None:
            w = d.workers()
            return w if len(w) == 4 and victim not in w else None
        now = wait_until(refilled, 10, "the slot to be refilled")
        assert before - {victim} < now  # type: ignore[operator]
        assert load.wait_for_ok(load.result.ok + 300)
        result = load.stop()
        # Only round trips in flight on the killed worker can fail, at most one per client thread.
        assert set(result.failures) <= {"reset", "short"}
        assert sum(result.failures.values()) <= 4, result.failures
        assert m.group(1) in {"0", "1", "2", "3"}


def test_term_finishes_in_flight_echoes_then_exits(tmp_path):
    port = free_port()
    d = Daemon(tmp_path, echo_config(port)).start()
    try:
        workers = d.workers()
        load = Load("127.0.0.1", port, threads=6, max_seconds=60).start("echo-keepalive")
        assert load.wait_for_ok(300)
        d.send(signal.SIGTERM)
        d.wait_log(r"graceful stop")
        # The held connections keep echoing after TERM, until the clients close them.
        assert load.wait_for_ok(load.result.ok + 300)
        assert d.proc.poll() is None
        result = load.stop()
        assert d.proc.wait(15) == 0
        assert result.failures == {}, (result.failures, result.examples)
        assert not any(alive(p) for p in workers)
        assert "SIGKILL" not in d.log()
    finally:
        d.stop()


def _time_wait_on(port: int) -> int:
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "06" and int(local.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def test_master_killed_with_sigkill_restarts_at_once(tmp_path):
    port = free_port()
    d = Daemon(tmp_path, echo_config(port)).start()
    held = []
    for i in range(8):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"ping%d" % i)
        assert s.recv(16) == b"ping%d" % i
        held.append(s)
    workers = d.workers()
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(alive(p) for p in workers), 10, "the orphaned workers to die")
    for s in held:
        assert s.recv(16) == b""  # the server side closed first ...
        s.close()
    # ... so its end of each connection now sits in TIME_WAIT on the listening port.
    wait_until(lambda: _time_wait_on(port) > 0, 5, "TIME_WAIT on the port")
    d2 = Daemon(tmp_path, echo_config(port)).start()
    try:
        assert _time_wait_on(port) > 0
        assert "Address already in use" not in d2.log()
        load = Load("127.0.0.1", port, threads=2, max_seconds=30).start("echo")
        assert load.wait_for_ok(100)
        assert load.stop().failures == {}
    finally:
        d2.stop()


def _notify_socket_of(pid: int) -> str:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    return env[b"NOTIFY_SOCKET"].decode()


def test_notify_from_a_stranger_is_ignored_and_counted(tmp_path):
    port = free_port()
    cfg = echo_config(port)
    with Daemon(tmp_path, cfg).start() as d:
        address = _notify_socket_of(min(d.workers()))
        load = Load("127.0.0.1", port, threads=4, max_seconds=60).start("echo")
        assert load.wait_for_ok(100)
        # Generation 2's workers never say READY=1; a stranger saying it for them must not count.
        d.write_config(fixture_config(port, "--no-ready", ready={"timeout": "3s"}, metrics=cfg["metrics"]))
        d.send(signal.SIGHUP)
        d.wait_log(r"generation 2 STARTING:")
        for _ in range(3):
            assert notify.notify("READY=1", address)
        d.wait_log(rf"ignored notify message from pid {os.getpid()}: not a worker")
        wait_until(lambda: value(scrape(cfg), REJECTED) == 3, 10, "3 rejected notify messages")
        d.wait_log(r"reload failed, still serving generation 1")
        assert d.log().count("ignored notify message from pid") == 1   # one line per burst
        d.wait_log(r"generation 2: not ready within 3s \(slots 0, 1, 2, 3 never sent READY=1\)")
        assert "generation 2 STARTING -> ACTIVE" not in d.log()
        assert value(scrape(cfg), REJECTED) == 3
        assert load.wait_for_ok(load.result.ok + 200)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)


COMMAND_CONFIG = """\
listeners:
  - {{name: echo, host: 127.0.0.1, port: {port}}}
workers:
  count: 2
  command: [{program}]
ready: {{timeout: 5s}}
drain: {{timeout: 10s}}
"""


@pytest.mark.parametrize("breakage", ["removed", "not executable"])
def test_command_that_becomes_unusable_fails_the_reload_at_its_line(tmp_path, breakage):
    port = free_port()
    program = tmp_path / "my-server"
    program.write_text(f"#!{sys.executable}\nimport sys\nfrom upgraderd.apps import echo\n"
                       "sys.exit(echo.main())\n")
    program.chmod(0o755)
    with Daemon(tmp_path, COMMAND_CONFIG.format(port=port, program=program)).start() as d:
        gen1 = d.workers()
        load = Load("127.0.0.1", port, threads=4, max_seconds=60).start("echo")
        assert load.wait_for_ok(100)
        if breakage == "removed":
            program.unlink()
        else:
            program.chmod(0o644)
        d.send(signal.SIGHUP)
        d.wait_log(r"reload failed, still serving generation 1")
        why = "': no such file" if breakage == "removed" else "' is not executable \\(no x permission\\)"
        d.wait_log(rf"{d.config_path}:5:13: workers.command\[0\]: '{program}{why}")
        assert load.wait_for_ok(load.result.ok + 200)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        assert d.workers() == gen1
        assert "generation 2" not in d.log()


def test_command_whose_interpreter_is_missing_fails_the_generation(tmp_path):
    port = free_port()
    program = tmp_path / "my-server"
    program.write_text("#!/nonexistent/python3\n")
    program.chmod(0o755)
    with Daemon(tmp_path, echo_config(port)).start() as d:
        d.write_config(COMMAND_CONFIG.format(port=port, program=program))
        d.send(signal.SIGHUP)
        d.wait_log(r"reload failed, still serving generation 1")
        d.wait_log(r"exited at start-up: exit code 127 \(command or its interpreter not found\?\)")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"still here")
            assert s.recv(16) == b"still here"


def test_http_readiness_that_never_answers_fails_the_generation(tmp_path):
    port = free_port()
    with Daemon(tmp_path, echo_config(port)).start() as d:
        load = Load("127.0.0.1", port, threads=4, max_seconds=60).start("echo")
        assert load.wait_for_ok(100)
        # The echo app serves no health endpoint: every probe is refused.
        d.write_config(echo_config(port, ready={"mode": "http", "timeout": "2s",
                                                "url": "http://127.0.0.1:{probe_port}/healthz"}))
        d.send(signal.SIGHUP)
        d.wait_log(r"not ready within 2s \(slots 0, 1, 2, 3 never answered 2xx at ready.url\)")
        d.wait_log(r"reload failed, still serving generation 1")
        d.wait_log(r"stopped probing pid \d+ at http://127\.0\.0\.1:\d+/healthz .*; "
                   r"last attempt: Connection refused", count=4)
        # The master's loop was never blocked by the probes: generation 1 served throughout.
        assert load.wait_for_ok(load.result.ok + 200)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
