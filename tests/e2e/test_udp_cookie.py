"""Flow-sticky UDP (`flows: cookie`, config/examples/flow_cookie.*) under the real daemon.

Flows started while generation N is ACTIVE carry N's cookie, and every one of
their datagrams is answered by N through the reloads that follow, while N
lingers for them; once N's flows go quiet N exits, its sockets go back to the
pool, and a
datagram with N's cookie is answered by the ACTIVE generation.
"""

from __future__ import annotations

import socket
import struct
import sys

import yaml

from tests.support import ROOT
from tests.support.udpload import UdpLoad
from tests.support.upgraderd_proc import Daemon, free_port, wait_until

NEW_FLOW = b"\0\0\0\0"
ANSWERS = 200   # per flow, before the next reload


def cookie_config(port: int) -> dict[str, object]:
    cfg = yaml.safe_load((ROOT / "config" / "examples" / "flow_cookie.yaml").read_text())
    cfg["listeners"][0]["port"] = port
    cfg["workers"]["command"] = [sys.executable, "config/examples/flow_cookie.py"]
    cfg["ready"]["timeout"] = "10s"
    cfg["drain"]["timeout"] = "30s"
    cfg["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
    return cfg


def gen_of(cookie: bytes) -> int:
    return int(struct.unpack(">HH", cookie)[0])


def flows(port: int) -> UdpLoad:
    return UdpLoad(port, flows=2, timeout=1.0, first_cookie=NEW_FLOW,
                   reply_check=lambda _out, reply: reply[:4]).start()


def test_every_datagram_of_a_flow_is_answered_by_the_generation_that_started_it(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.1", 0))
        port = u.getsockname()[1]
    loads: dict[int, UdpLoad] = {}
    with Daemon(tmp_path, cookie_config(port)) as d:
        d.start()
        try:
            for gen in (1, 2, 3):
                loads[gen] = flows(port)
                wait_until(lambda: all(s.answered >= ANSWERS for load in loads.values() for s in load.stats),
                           30, f"{ANSWERS} answers per flow with generation {gen} ACTIVE")
                d.reload_to(gen + 1)
            wait_until(lambda: all(s.answered >= 3 * ANSWERS for load in loads.values() for s in load.stats),
                       30, "answers from every lingering generation")
            # Generations 1, 2 and 3 still serve their own flows (a worker without one has
            # gone quiet and exited): more workers than generation 4's two.
            assert len(d.workers()) > 2 + 2
            loads[1].stop()
            d.wait_log(r"generation 1 DRAINING -> RETIRED")
            d.wait_log(r"listener 127\.0\.0\.1:\d+ \(udp/cookie@1, slot 1\): its socket #\d+ is back in the pool")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as late:
                late.settimeout(5)
                late.sendto(struct.pack(">HH", 1, 0) + b"late", ("127.0.0.1", port))
                assert gen_of(late.recv(100)[:4]) == 4   # gen 1 is gone: the ACTIVE one answers
        finally:
            for load in loads.values():
                load.stop()
        for gen, load in loads.items():
            assert load.lost == [], f"generation {gen}'s flows lost {load.lost[:10]}"
            for s in load.stats:
                assert s.answered + len(s.late) == s.sent >= 3 * ANSWERS
                # One cookie for the whole flow, the one of the generation ACTIVE when it started.
                assert [gen_of(c) for _seq, c in s.cookies] == [gen], s.cookies
        assert d.stop() == 0
