"""Hand-off of live connections: real daemon, real clients, real signals (issue 9, part 1)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys

import pytest

from tests.support.upgraderd_proc import ROOT, Daemon, alive, echo_config, free_port, wait_until
from tests.support.persistent import Streams, generation_pids, worker_connections
from tests.support.scrape import scrape, value
from upgraderd.contract import wire
from upgraderd.worker import peers

pytestmark = pytest.mark.e2e


def generation_workers(d: Daemon, generation: int) -> dict[int, int]:
    """Return {slot: pid} of the master's live workers of `generation`."""
    return generation_pids(d.workers(), generation)


def counter(cfg: dict[str, object], name: str, **labels: str) -> float:
    """Return one sample of the daemon's metrics, 0 if the series does not exist yet."""
    try:
        return value(scrape(cfg), name, **labels)  # type: ignore[arg-type]
    except KeyError:
        return 0.0


def retired_after(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"DRAINING -> RETIRED after ([0-9.]+)s", log)]


@pytest.mark.parametrize("mode", ["reuseport", "shared"])
def test_persistent_echo_connections_move_across_three_hups(tmp_path, mode):
    port = free_port()
    cfg = echo_config(port, mode=mode)
    with Daemon(tmp_path, cfg).start() as d:
        streams = Streams(port, 16).start()
        assert streams.wait_ok(200)
        for n in (2, 3, 4):
            d.hup()
            d.wait_log(rf"reload done: generation {n} ACTIVE")
            d.wait_log(rf"generation {n - 1} DRAINING -> RETIRED")
            assert streams.wait_ok(streams.result.ok + 160)
        result = streams.stop()
        assert result.failures == {}, result.examples
        assert result.ports_kept
        # Every connection moved at every reload, and the old generation left at once.
        wait_until(lambda: counter(cfg, "upgraderd_connections_taken_over_total", listener="echo") == 48,
                   10, "48 connections taken over")
        assert counter(cfg, "upgraderd_connections_handed_off_total", listener="echo") == 48
        assert all(t < 2.0 for t in retired_after(d.log())), d.log()
        assert "SIGKILL" not in d.log()


def test_keepalive_http_connections_move_between_requests(tmp_path):
    port = free_port()
    cfg = echo_config(port, workers={"count": 2, "app": "http"})
    with Daemon(tmp_path, cfg).start() as d:
        streams = Streams(port, 8, kind="http").start()
        assert streams.wait_ok(100)
        for n in (2, 3):
            d.hup()
            d.wait_log(rf"reload done: generation {n} ACTIVE")
            d.wait_log(rf"generation {n - 1} DRAINING -> RETIRED")
        before = sum(v for k, v in streams.result.bodies.items() if k.startswith("generation=3 "))
        assert streams.wait_ok(streams.result.ok + 80)
        result = streams.stop()
        assert result.failures == {}, result.examples
        assert result.reconnects == 0  # moved, not closed with `Connection: close`
        assert sum(v for k, v in result.bodies.items() if k.startswith("generation=3 ")) > before
        assert counter(cfg, "upgraderd_connections_handed_off_total", listener="echo") == 16


def test_a_receiver_killed_mid_handoff_loses_nothing(tmp_path):
    port = free_port()
    cfg = echo_config(port, count=2, ready={"mode": "delay", "after": "5s", "timeout": "20s"})
    with Daemon(tmp_path, cfg).start() as d:
        streams = Streams(port, 12).start()
        assert streams.wait_ok(100)
        d.hup()
        # Gen 2 is alive with its channels open but not ACTIVE yet (ready after 5 s):
        # stop slot 0 so that it accepts the channel connection and never answers.
        wait_until(lambda: len([c for c in peers.listening_channels(d.pid) if c.generation == 2]) == 2,
                   10, "both gen-2 channels")
        victim = generation_workers(d, 2)[0]
        os.kill(victim, signal.SIGSTOP)
        assert "generation 1 ACTIVE -> DRAINING" not in d.log(), "too slow: gen 2 was ACTIVE before the stop"
        d.wait_log(r"generation 1 ACTIVE -> DRAINING", timeout=30)
        os.kill(victim, signal.SIGKILL)  # mid-hand-off: the givers are offering or waiting on it
        d.wait_log(r"generation 1 DRAINING -> RETIRED")
        assert streams.wait_ok(streams.result.ok + 120)
        result = streams.stop()
        assert result.failures == {}, result.examples
        assert result.ports_kept
        # A giver that reached the victim (it says "to 2 worker(s)") offered to it and lost that
        # lane: it counts the failure in its metric files, which reach /metrics on its next flush
        # or when the master folds them at exit. A giver that looked only after the SIGKILL could
        # not connect to the victim ("to 1 worker(s)"), which is no failure (giver.py).
        # (Generation 1 has retired: each of its workers that held a connection has logged it.)
        reached = [int(n) for n in re.findall(r"handed \d+ of \d+ connection\(s\) to (\d+) worker", d.log())]
        assert reached, "no gen-1 worker handed anything"
        if 2 in reached:
            wait_until(lambda: counter(cfg, "upgraderd_handoff_failures_total", reason="timeout")
                       + counter(cfg, "upgraderd_handoff_failures_total", reason="taker_gone") >= 1,
                       10, "the failed offer to the killed taker counted")
        else:
            assert set(reached) == {1}, reached
        wait_until(lambda: counter(cfg, "upgraderd_connections_taken_over_total", listener="echo") == 12,
                   10, "all 12 connections taken by the surviving worker")
        assert not alive(victim)


def test_a_stranger_and_garbage_on_the_channel_are_refused_and_counted(tmp_path):
    port = free_port()
    out = tmp_path / "garbage.json"
    cmd = {"count": 2, "command": [sys.executable, str(ROOT / "tests/fixtures/handoff_garbage.py"), str(out)]}
    cfg = echo_config(port, count=2, workers=cmd)
    with Daemon(tmp_path, cfg).start() as d:
        cfg = {**cfg, "workers": {"count": 2, "app": "echo"}}
        d.write_config(cfg)
        d.hup()
        d.wait_log(r"reload done: generation 2 ACTIVE")
        d.wait_log(r"generation 1 DRAINING -> RETIRED")
        seen = json.loads(out.read_text())
        assert len(seen) == 5 and all(seen.values()), seen
        # A stranger (this test process: not a worker of the master) is refused at once.
        takers = [c for c in peers.listening_channels(d.pid) if c.generation == 2]
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(5)
            s.connect(wire.address(takers[0].name))
            try:
                s.send(b"let me in")
                assert s.recv(100) == b""
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed before or after our message, unread: refused all the same
        # Both gen-1 workers sent the same 5 malformed messages.
        wait_until(lambda: counter(cfg, "upgraderd_handoff_failures_total", reason="malformed") == 10,
                   10, "10 malformed messages counted")
        wait_until(lambda: counter(cfg, "upgraderd_handoff_failures_total", reason="untrusted_giver") == 1,
                   10, "the stranger counted")
        # The takers survived and still serve.
        assert set(generation_workers(d, 2)) == {0, 1}
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"still here")
            assert c.recv(100) == b"still here"


def test_a_retiring_slot_hands_its_connections_to_its_siblings(tmp_path):
    port = free_port()
    cfg = echo_config(port, count=3)
    with Daemon(tmp_path, cfg).start() as d:
        streams = Streams(port, 24).start()
        assert streams.wait_ok(200)
        retiring = generation_workers(d, 1)[2]
        held = worker_connections({retiring}, port)[retiring]
        d.send(signal.SIGTTOU)
        d.wait_log(r"generation 1 slot 2: retired")
        assert streams.wait_ok(streams.result.ok + 200)
        result = streams.stop()
        assert result.failures == {}, result.examples
        assert result.ports_kept
        assert held > 0
        assert counter(cfg, "upgraderd_connections_handed_off_total", listener="echo") == held
        assert "exit code 0" in d.log().split("slot 2: retired")[1].splitlines()[0]


def test_handoff_off_drains_as_before(tmp_path):
    port = free_port()
    cfg = echo_config(port, count=2, drain={"timeout": "10s", "handoff": "off"})
    with Daemon(tmp_path, cfg).start() as d:
        streams = Streams(port, 8).start()
        assert streams.wait_ok(100)
        old = set(generation_workers(d, 1).values())
        d.hup()
        d.wait_log(r"reload done: generation 2 ACTIVE")
        assert peers.listening_channels(d.pid) == []
        # An echo stream never goes idle: without hand-off the old workers keep their clients.
        assert streams.wait_ok(streams.result.ok + 100)
        assert all(alive(p) for p in old)
        assert "generation 1 DRAINING -> RETIRED" not in d.log()
        result = streams.stop()
        d.wait_log(r"generation 1 DRAINING -> RETIRED")
        assert result.failures == {}, result.examples
        assert counter(cfg, "upgraderd_connections_handed_off_total", listener="echo") == 0


def example_config(name: str, port: int) -> dict[str, object]:
    """Return config/examples/<name>.yaml on a free port, run by this interpreter as a `command:`."""
    import yaml
    cfg = yaml.safe_load((ROOT / "config" / "examples" / f"{name}.yaml").read_text())
    cfg["listeners"][0]["port"] = port
    cfg["workers"].pop("app", None)   # a module:factory example runs as an exec'd worker here
    cfg["workers"].pop("cwd", None)
    cfg["workers"]["command"] = [sys.executable, str(ROOT / "config" / "examples" / f"{name}.py")]
    return cfg


class Lines:
    """A line client with a deadline on every read."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.port = self.sock.getsockname()[1]
        self.buf = b""

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def line(self) -> str:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(4096)
            assert chunk, "connection closed"
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def ask(self, text: str) -> str:
        self.send(text + "\n")
        return self.line()


def test_pubsub_example_subscriber_keeps_its_subscriptions_across_reloads(tmp_path):
    port = free_port()
    with Daemon(tmp_path, example_config("pubsub", port)).start() as d:
        sub = Lines(port)
        assert sub.ask("SUB news") == "OK sub news"
        assert sub.ask("WHO").startswith("WHO generation=1 ")
        sub.send("SUB spo")  # half a line: it moves as bytes read but not handled
        for n in (2, 3):
            d.hup()
            d.wait_log(rf"generation {n - 1} DRAINING -> RETIRED")
        sub.send("rts\n")
        assert sub.line() == "OK sub sports"
        assert sub.ask("WHO").startswith("WHO generation=3 ")
        assert sub.ask("TOPICS") == "TOPICS news sports"
        pub = Lines(port)
        assert pub.ask("PUB news hello after two reloads") == "OK pub 1"
        assert sub.line() == "MSG news hello after two reloads"
        assert sub.sock.getsockname()[1] == sub.port  # the same connection all along
        assert "SIGKILL" not in d.log()
        sub.sock.close()
        pub.sock.close()


def test_threaded_workers_give_from_every_thread_and_take_in_the_main_one(tmp_path):
    port = free_port()
    cfg = echo_config(port, workers={"count": 2, "app": "echo", "threads": 3})
    with Daemon(tmp_path, cfg).start() as d:
        streams = Streams(port, 12).start()
        assert streams.wait_ok(100)
        for n in (2, 3):
            d.hup()
            d.wait_log(rf"generation {n - 1} DRAINING -> RETIRED")
        assert streams.wait_ok(streams.result.ok + 120)
        result = streams.stop()
        assert result.failures == {}, result.examples
        assert result.ports_kept
        assert counter(cfg, "upgraderd_connections_handed_off_total", listener="echo") == 24
        assert "SIGKILL" not in d.log()
