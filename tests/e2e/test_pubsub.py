"""config/examples/pubsub.py under reloads and a stop: real daemon, real clients, real signals.

The example is a `module:factory` app (`app: "pubsub:make"`) written on
`upgraderd.worker` alone. What it shows: a broadcast server that holds
delivery while moved connections are still arriving (`Taker.arriving`) loses
no message when more connections move than fit one hand-off batch (64); and a
server that offers its connections on a reload closes them at once on a stop
(`Drain.reason`), instead of serving on until `drain.timeout`.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from tests.support.broadcast import Broadcast
from tests.support.upgraderd_proc import ROOT, Daemon, free_port

pytestmark = pytest.mark.e2e

EXAMPLES = ROOT / "config" / "examples"


def pubsub_config(port: int, drain_timeout: str = "20s") -> dict[str, object]:
    """Return config/examples/pubsub.yaml on `port`, its module found in config/examples."""
    cfg = yaml.safe_load((EXAMPLES / "pubsub.yaml").read_text())
    cfg["listeners"][0]["port"] = port
    if "app" in cfg["workers"]:
        cfg["workers"]["cwd"] = str(EXAMPLES)
    else:
        cfg["workers"]["command"] = [sys.executable, str(EXAMPLES / "pubsub.py")]
    cfg["workers"]["warm"] = True   # a standby takes each HUP: shorter reloads, a leaner test
    cfg["drain"]["timeout"] = drain_timeout
    cfg["ready"]["timeout"] = "20s"
    return cfg


def test_100_subscribers_get_every_message_once_in_order_across_reloads(tmp_path):
    """100 subscribers (more than one hand-off batch of 64), a publisher publishing throughout,
    20 HUPs: every message reaches all 100, once, in order, on their original connections.
    bench/pubsub_reload.py runs the same with any number of subscribers and reloads."""
    port = free_port()
    with Daemon(tmp_path, pubsub_config(port)).start() as d:
        clients = Broadcast(port, 100).start()
        try:
            clients.wait_published(20)
            for n in range(2, 22):
                d.hup()
                d.wait_log(rf"generation {n - 1} DRAINING -> RETIRED", timeout=30)
                clients.wait_published(20)
            clients.finish()
            assert clients.problems() == []
            assert clients.published >= 20 * 21
            assert "SIGKILL" not in d.log()
        finally:
            clients.close()


def test_a_stop_closes_the_clients_at_once_where_a_reload_hands_them_over(tmp_path):
    """`upgraderd stop` with 10 subscribers and drain.timeout 60s: the worker reads the stop
    (Drain.reason == "stop"), attempts no hand-off, closes its clients and exits; the master
    is gone long before drain.timeout and SIGKILLs nobody. A reload first shows the other
    reason: the same clients are handed over."""
    port = free_port()
    with Daemon(tmp_path, pubsub_config(port, drain_timeout="60s")).start() as d:
        clients = Broadcast(port, 10)
        try:
            d.hup()
            d.wait_log(r"generation 1 DRAINING -> RETIRED")
            assert "reload: handed 11 of 11 connection(s)" in d.log()
            stop = subprocess.run([sys.executable, "-m", "upgraderd", "stop", "--pidfile", str(d.pidfile)],
                                  capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=ROOT)
            assert stop.returncode == 0, stop.stderr
            assert d.proc is not None
            d.proc.wait(30)   # a bound for a hang, half of drain.timeout; not a measurement
            log = d.log()
            assert re.search(r"pubsub generation 2 pid \d+: stop: closing 11 connection\(s\), no hand-off", log), log
            assert log.count("reload: handed") == 1, log   # generation 1's only: the stop tried no hand-off
            assert "SIGKILL" not in log
            for sub in clients.subs:
                sub.sock.settimeout(5)
                assert sub.sock.recv(100) == b"", "a subscriber's connection stayed open"
        finally:
            clients.close()
