"""SIGUSR2: the master execs the upgraderd now on disk in place, and nothing is dropped."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time

import pytest

from tests.support import ROOT
from tests.support.loadgen import Load
from tests.support.upgraderd_proc import Daemon, alive, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e


def test_usr2_reexecs_the_master_in_place_under_load(tmp_path):
    port = free_port()
    with Daemon(tmp_path, echo_config(port)).start() as d:
        gen1 = d.workers()
        load = Load("127.0.0.1", port, threads=6, max_seconds=90).start("echo")
        assert load.wait_for_ok(200)
        d.hup()
        d.wait_log(r"reload done: generation 2 ACTIVE")
        gen2 = d.wait_workers(4, none_of=gen1)
        for upgrade in (1, 2, 3):
            d.send(signal.SIGUSR2)
            d.wait_log(r"upgraded the master in place", count=upgrade)
            d.wait_log(rf"reload done: generation {2 + upgrade} ACTIVE")
        assert d.proc.poll() is None  # the same process, so the same pid, still runs
        # The workers the first exec'd master inherited were drained and reaped by it.
        wait_until(lambda: not any(alive(p) for p in gen2), 15, "generation 2 to exit")
        d.wait_workers(4, none_of=gen2)
        assert load.wait_for_ok(load.result.ok + 300)
        # A HUP still works after the upgrades, and generation numbers carry on.
        d.hup()
        d.wait_log(r"reload done: generation 6 ACTIVE")
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        log = d.log()
        assert re.findall(r"adopted (\d+) workers of generations (\d+)", log)[0] == ("4", "2")
        assert "FAILED" not in log and "Traceback" not in log
    assert d.proc.returncode == 0


def test_usr2_with_an_invalid_config_keeps_the_running_master(tmp_path):
    port = free_port()
    with Daemon(tmp_path, echo_config(port)).start() as d:
        workers = d.workers()
        d.write_config("listeners: [\n")
        d.send(signal.SIGUSR2)
        d.wait_log(r"master upgrade refused, the config is invalid")
        assert re.search(r"upgraderd\.yaml:2:1: YAML syntax error", d.log())
        assert d.workers() == workers
        assert "upgraded the master in place" not in d.log()


def test_usr2_refuses_new_code_that_cannot_import_and_keeps_serving(tmp_path):
    # The master runs from a copy of the package; the "deploy" then breaks one module
    # of that copy. The preflight imports every module, fails, and nothing is exec'd.
    code = tmp_path / "code"
    shutil.copytree(ROOT / "upgraderd", code / "upgraderd", ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    with Daemon(tmp_path, echo_config(port), cwd=code).start() as d:
        workers = d.workers()
        load = Load("127.0.0.1", port, threads=2, max_seconds=60).start("echo")
        assert load.wait_for_ok(100)
        (code / "upgraderd" / "apps" / "http.py").write_text("def broken(:\n")
        d.send(signal.SIGUSR2)
        d.wait_log(r"master upgrade refused: the preflight of the new code failed \(exit code 1\)")
        assert re.search(r"upgraderd preflight: cannot import upgraderd\.apps\.http", d.log())
        assert "upgraded the master in place" not in d.log()
        assert d.workers() == workers
        assert load.wait_for_ok(load.result.ok + 100)
        result = load.stop()
        assert result.failures == {}, (result.failures, result.examples)
        # Fixed on disk: the next USR2 goes through.
        shutil.copy2(ROOT / "upgraderd" / "apps" / "http.py", code / "upgraderd" / "apps" / "http.py")
        d.send(signal.SIGUSR2)
        d.wait_log(r"upgraded the master in place")
        d.wait_log(r"reload done: generation 2 ACTIVE")


def test_exec_failure_leaves_the_old_master_running():
    from upgraderd.system import reexec
    r, w = os.pipe()
    try:
        before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        err = reexec.exec_master(b"{}", [r, w], ["run"], executable="/nonexistent/python")
        assert isinstance(err, FileNotFoundError)
        assert not os.get_inheritable(r) and not os.get_inheritable(w)
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    finally:
        os.close(r)
        os.close(w)


def test_counters_carry_on_across_usr2(tmp_path):
    from tests.support.scrape import scrape, value

    port = free_port()
    cfg = echo_config(port, count=2)
    with Daemon(tmp_path, cfg).start() as d:
        load = Load("127.0.0.1", port, threads=3, max_seconds=60).start("echo")
        assert load.wait_for_ok(300)
        d.hup()
        d.wait_log(r"reload done: generation 2 ACTIVE")
        load.stop()
        ok_before = load.result.ok
        # A busy worker writes out its counts every 20 ms: wait for the last ones.
        wait_until(lambda: value(scrape(cfg), "upgraderd_connections_accepted_total", listener="echo")
                   == ok_before, 15, "the connections to be counted")
        before = scrape(cfg)
        assert value(before, "upgraderd_reloads_total", result="success") == 1
        assert value(before, "upgraderd_connections_accepted_total", listener="echo") == ok_before
        d.send(signal.SIGUSR2)
        d.wait_log(r"reload done: generation 3 ACTIVE")
        load = Load("127.0.0.1", port, threads=3, max_seconds=60).start("echo")
        assert load.wait_for_ok(100)
        result = load.stop()
        assert result.failures == {}
        # Wait for the workers to write out their counts, then compare: nothing was reset.
        wait_until(lambda: value(scrape(cfg), "upgraderd_connections_accepted_total", listener="echo")
                   == ok_before + result.ok, 15, "the new connections to be counted")
        after = scrape(cfg)
        assert value(after, "upgraderd_reloads_total", result="success") == 2
        assert value(after, "upgraderd_generation") == 3


def test_templates_started_counts_on_after_usr2(tmp_path):
    """A prefork generation rolled by the re-exec'd master counts its template (it stopped counting once)."""
    from tests.support.scrape import scrape, value

    port = free_port()
    cfg = echo_config(port, workers={"count": 1, "app": "echo", "prefork": True})
    with Daemon(tmp_path, cfg).start() as d:
        assert value(scrape(cfg), "upgraderd_templates_started_total", kind="cold") == 1
        d.send(signal.SIGUSR2)
        d.wait_log(r"reload done: generation 2 ACTIVE")
        assert re.search(r"generation 2: template pid \d+ started", d.log())
        assert value(scrape(cfg), "upgraderd_templates_started_total", kind="cold") == 2


def _socket_inodes(pid: int, skip: set[int] = frozenset()) -> set[str]:
    """Return the socket inodes `pid` holds open, leaving out the fd numbers in `skip`."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if int(fd) in skip:
            continue
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


def test_after_usr2_workers_inherit_only_their_listeners(tmp_path):
    with Daemon(tmp_path, echo_config(free_port(), count=2)).start() as d:
        d.send(signal.SIGUSR2)
        d.wait_log(r"reload done: generation 2 ACTIVE")
        workers = d.wait_workers(2)
        master_sockets = _socket_inodes(d.pid)
        for pid in workers:
            # fd 3 is the worker's one listener; no other master socket may leak in.
            assert not _socket_inodes(pid, skip={3}) & master_sockets, pid


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.002, 0.005])
def test_term_right_after_usr2_is_not_lost(tmp_path, delay):
    d = Daemon(tmp_path, echo_config(free_port(), count=2)).start()
    try:
        d.send(signal.SIGUSR2)
        time.sleep(delay)  # the gap under test: TERM lands around the exec
        d.send(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        assert "graceful stop" in d.log()
    finally:
        d.stop()
