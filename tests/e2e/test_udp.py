"""UDP listeners under the real daemon: echo answers datagrams, and reloads lose none.

The client is closed-loop with sequence numbers (tests/support/udpload.py): a
datagram not answered within its timeout is a loss. The slot sockets are the
master's, so the socket inodes the workers report in
`upgraderd_udp_receive_drops{socket=...}` are the same before and after every
reload, and that counter (SO_RXQ_OVFL, read from the kernel) stays 0.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest

from tests.support.scrape import scrape
from tests.support.udpload import UdpLoad, free_udp_port
from tests.support.upgraderd_proc import Daemon, echo_config, stop_after_restart, wait_until

RELOADS = 8            # bench/udp.py runs the full 20 HUPs 1 s apart
ANSWERS_BETWEEN = 150  # answers the client must get between two reloads


def udp_config(port: int, count: int = 2, mode: str = "reuseport") -> dict[str, object]:
    cfg = echo_config(port, count=count)
    cfg["listeners"] = [{"name": "dns", "host": "127.0.0.1", "port": port, "protocol": "udp", "mode": mode},
                        {"name": "tcp", "host": "127.0.0.1", "port": port}]
    return cfg



def samples_of(samples: dict, metric: str) -> dict[tuple, float]:
    return {labels: v for (name, labels), v in samples.items() if name == metric}


def total(samples: dict, metric: str, listener: str) -> float:
    return sum(v for labels, v in samples_of(samples, metric).items() if ("listener", listener) in labels)


def drop_sockets(cfg: dict) -> dict[str, float]:
    """Return {socket inode: drops} of the UDP listener, as the live workers report it."""
    return {dict(labels)["socket"]: v
            for labels, v in samples_of(scrape(cfg), "upgraderd_udp_receive_drops").items()}


def test_udp_and_tcp_echo_on_one_port(tmp_path):
    port = free_udp_port()
    with Daemon(tmp_path, udp_config(port)) as d:
        d.start()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(5)
            u.sendto(b"hello udp", ("127.0.0.1", port))
            assert u.recv(100) == b"hello udp"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as t:
            t.sendall(b"hello tcp")
            assert t.recv(100) == b"hello tcp"
        assert d.stop() == 0


def test_reloads_under_udp_load_lose_no_datagram(tmp_path):
    port = free_udp_port()
    cfg = udp_config(port)
    with Daemon(tmp_path, cfg) as d:
        d.start()
        before = wait_until(lambda: (s := drop_sockets(cfg)) and len(s) == 2 and s, 10,
                            "both slot sockets reported")
        load = UdpLoad(port, flows=4, timeout=1.0).start()
        try:
            for gen in range(2, RELOADS + 2):
                floor = load.answered + ANSWERS_BETWEEN
                wait_until(lambda: load.answered >= floor, 20, f"{ANSWERS_BETWEEN} answers before HUP {gen - 1}")
                d.reload_to(gen)
            # One USR2 too: the new master inherits the slot sockets with everything queued.
            floor = load.answered + ANSWERS_BETWEEN
            wait_until(lambda: load.answered >= floor, 20, "answers before USR2")
            d.send(signal.SIGUSR2)
            d.wait_log(r"upgraded the master in place")
            d.wait_log(rf"reload done: generation {RELOADS + 2} ACTIVE")
            floor = load.answered + ANSWERS_BETWEEN
            wait_until(lambda: load.answered >= floor, 20, "answers after the last reload")
        finally:
            load.stop()
        assert load.lost == [], f"lost {len(load.lost)} of {load.sent}: {load.lost[:20]}"
        # `late`: answered after the client's 1 s timeout (a stall on a busy machine), not dropped.
        assert load.answered + load.late == load.sent > (RELOADS + 2) * ANSWERS_BETWEEN
        # The cross-check: every datagram was read once and answered once, and the kernel
        # dropped none on the slot sockets, which are the very sockets of generation 1.
        d.settled()

        def counted() -> dict | None:
            s = scrape(cfg)
            ok = total(s, "upgraderd_datagrams_received_total", "dns") == load.sent
            return s if ok and total(s, "upgraderd_datagrams_sent_total", "dns") == load.sent else None
        s = wait_until(counted, 15, f"the workers' datagram counters to reach {load.sent}")
        assert total(s, "upgraderd_datagrams_unsent_total", "dns") == 0
        after = wait_until(lambda: (x := drop_sockets(cfg)) and set(x) == set(before) and x, 10,
                           "the live workers to report the same two slot sockets")
        assert after == {inode: 0.0 for inode in before}
        assert d.stop() == 0


def test_slots_that_retire_lose_no_datagram(tmp_path):
    """Fewer workers (a reload, then TTOU): a retiring slot is steered away, read empty, then closed."""
    port = free_udp_port()
    cfg = udp_config(port, count=3)
    with Daemon(tmp_path, cfg) as d:
        d.start()
        t0 = time.monotonic()
        marks: dict[str, float] = {}   # when each step began, in s after t0: for a failure's message
        load = UdpLoad(port, flows=4, timeout=1.0).start()
        try:
            floor = load.answered + ANSWERS_BETWEEN
            wait_until(lambda: load.answered >= floor, 20, "answers from three slots")
            d.write_config(udp_config(port, count=2) | {"metrics": cfg["metrics"]})
            marks["HUP"] = round(time.monotonic() - t0, 3)
            d.reload_to(2)
            d.wait_log(r"closed listener 127\.0\.0\.1:\d+ \(udp/reuseport, slot 2\)")
            marks["slot 2 closed"] = round(time.monotonic() - t0, 3)
            floor = load.answered + ANSWERS_BETWEEN
            wait_until(lambda: load.answered >= floor, 20, "answers from two slots")
            marks["TTOU"] = round(time.monotonic() - t0, 3)
            d.send(signal.SIGTTOU)
            d.wait_log(r"closed listener 127\.0\.0\.1:\d+ \(udp/reuseport, slot 1\)")
            marks["slot 1 closed"] = round(time.monotonic() - t0, 3)
            floor = load.answered + ANSWERS_BETWEEN
            wait_until(lambda: load.answered >= floor, 20, "answers from one slot")
        finally:
            load.stop()
        # Seen once in a full run (1 of 16,497; not reproduced in 52 runs beside two CPU hogs):
        # the message says when each loss was sent, beside the steps and the master's log.
        assert load.lost == [], (f"lost {len(load.lost)} of {load.sent} (flow, seq, sent at s): "
                                 f"{load.lost_since(t0)[:20]}; steps at s: {marks}\n{d.log()[-4000:]}")
        assert load.answered + load.late == load.sent > 3 * ANSWERS_BETWEEN
        assert "slot socket(s)" not in d.log()  # no close while datagrams could still arrive
        assert d.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="pidfd_getfd needs ptrace rights over the orphans (root here)")
def test_a_restarted_master_takes_the_udp_slot_sockets_over_from_its_orphans(tmp_path):
    """SIGKILL the master under UDP load and start another: it adopts each orphan's UDP socket
    (fd 3) and TCP socket (fd 4) for the right listener, and no datagram is lost."""
    port = free_udp_port()
    cfg = udp_config(port)
    cfg["drain"] = {"timeout": "10s", "orphan_grace": "30s"}
    d = Daemon(tmp_path, cfg).start()
    before = wait_until(lambda: (s := drop_sockets(cfg)) and len(s) == 2 and s, 10, "both slot sockets")
    orphans: set[int] = set()
    d2 = None
    load = UdpLoad(port, flows=4, timeout=1.0).start()
    try:
        wait_until(lambda: load.answered >= ANSWERS_BETWEEN, 20, "answers from the first master")
        orphans = d.workers()
        d.send(signal.SIGKILL)
        assert d.proc is not None
        d.proc.wait(10)
        d2 = Daemon(tmp_path, cfg).start()
        log = d2.log()
        assert len(re.findall(r"adopted fd 3 of orphan pid \d+ for listener 'dns' slot \d \(127", log)) == 2
        assert len(re.findall(r"adopted fd 4 of orphan pid \d+ for listener 'tcp' slot \d \(127", log)) == 2
        d2.wait_log(r"the orphaned workers have exited")
        floor = load.answered + ANSWERS_BETWEEN
        wait_until(lambda: load.answered >= floor, 20, "answers from the second master")
        # The very sockets of the first master (same inodes), and the kernel dropped nothing.
        after = wait_until(lambda: (x := drop_sockets(cfg)) and set(x) == set(before) and x, 10,
                           "the new workers to report the adopted slot sockets")
    finally:
        load.stop()
        stop_after_restart(orphans, d, d2)
    assert load.lost == [], f"lost {len(load.lost)} of {load.sent}: {load.lost[:20]}"
    assert "cannot listen" not in d2.log()
    assert after == {inode: 0.0 for inode in before}
