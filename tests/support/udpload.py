"""A closed-loop UDP client with sequence numbers, for the UDP e2e tests and bench/udp.py.

Each flow is one thread with its own socket (its own source port, so the
kernel's reuseport choice spreads the flows). It sends one datagram
`FLOW SEQ PAYLOAD`, waits for the answer that carries the same flow and
sequence number, and only then sends the next. An answer that does not come
within `timeout` is a loss: the flow counts it and goes on with the next
sequence number (a retransmission would be a loss too). An answer that comes
after its timeout moves its datagram from `lost` to `late`: it was not
dropped, only slow (a noisy machine can stall a process for a second). Foreign
answers are counted apart; neither is ever taken for the awaited one.

Bounded: every flow stops at `max_per_flow` datagrams or when `stop()` is
called, and `stop()` joins the threads with a deadline.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class FlowStats:
    """What one flow saw."""

    sent: int = 0
    answered: int = 0
    lost: list[int] = field(default_factory=list)   # sequence numbers never answered in time
    sent_at: dict[int, float] = field(default_factory=dict)  # when each lost one was sent (monotonic)
    late: list[int] = field(default_factory=list)   # answered, but after their timeout
    stray: int = 0                                   # answers that are not ours
    cookies: list[tuple[int, bytes]] = field(default_factory=list)  # (seq, cookie) where it changed


class UdpLoad:
    """`flows` closed-loop clients of 127.0.0.1:`port` (or `host`), each in its own thread."""

    def __init__(self, port: int, flows: int = 4, host: str = "127.0.0.1", timeout: float = 1.0,
                 max_per_flow: int = 200_000, payload: bytes = b"x" * 32,
                 reply_check: Callable[[bytes, bytes], bytes | None] | None = None,
                 first_cookie: bytes = b"") -> None:
        """`reply_check(sent, reply)` may return a cookie to put before the flow's next datagram."""
        self.first_cookie = first_cookie
        self.addr = (host, port)
        self.timeout = timeout
        self.max_per_flow = max_per_flow
        self.payload = payload
        self.reply_check = reply_check
        self.stats = [FlowStats() for _ in range(flows)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"udp-flow-{i}", daemon=True)
                         for i in range(flows)]

    def start(self) -> UdpLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self, deadline: float = 10.0) -> None:
        """Stop every flow after its datagram in flight, and wait for them (bounded)."""
        self._stop.set()
        end = time.monotonic() + deadline
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
            assert not t.is_alive(), f"{t.name} did not stop"

    @property
    def sent(self) -> int:
        return sum(s.sent for s in self.stats)

    @property
    def answered(self) -> int:
        return sum(s.answered for s in self.stats)

    @property
    def late(self) -> int:
        return sum(len(s.late) for s in self.stats)

    @property
    def lost(self) -> list[tuple[int, int]]:
        """Return (flow, sequence number) of every datagram not answered in time."""
        return [(i, seq) for i, s in enumerate(self.stats) for seq in s.lost]

    def lost_since(self, t0: float) -> list[tuple[int, int, float]]:
        """Return (flow, sequence number, seconds after `t0` it was sent) of every datagram lost."""
        return [(i, seq, round(s.sent_at.get(seq, t0) - t0, 3)) for i, s in enumerate(self.stats) for seq in s.lost]

    def _run(self, flow: int) -> None:
        st = self.stats[flow]
        cookie = self.first_cookie
        with socket.socket(socket.AF_INET6 if ":" in self.addr[0] else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(self.addr)
            for seq in range(self.max_per_flow):
                if self._stop.is_set():
                    return
                head = b"%d %d " % (flow, seq)
                out = cookie + head + self.payload
                try:
                    s.send(out)
                except OSError:
                    st.lost.append(seq)
                    continue
                st.sent += 1
                sent_at = time.monotonic()
                reply = self._await(s, out, head, st)
                if reply is None:
                    st.lost.append(seq)
                    st.sent_at[seq] = sent_at
                    continue
                st.answered += 1
                if self.reply_check is not None:
                    got = self.reply_check(out, reply) or self.first_cookie
                    if not st.cookies or st.cookies[-1][1] != got:
                        st.cookies.append((seq, got))
                    cookie = got

    def _await(self, s: socket.socket, out: bytes, head: bytes, st: FlowStats) -> bytes | None:
        """Return the answer to `out`, or None once `timeout` has passed without it."""
        end = time.monotonic() + self.timeout
        while (left := end - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                reply = s.recv(65536)
            except socket.timeout:
                return None
            except ConnectionRefusedError:
                # ICMP port unreachable: no socket was bound at all. The datagram is lost.
                return None
            if head in reply and reply.endswith(self.payload):
                return reply
            m = re.search(rb"(\d+) (\d+) " + re.escape(self.payload) + rb"\Z", reply)
            seq = int(m.group(2)) if m is not None else -1
            if seq in st.lost[-64:]:
                st.lost.remove(seq)
                st.late.append(seq)
            else:
                st.stray += 1
        return None


def free_udp_port() -> int:
    """Return a port free for both UDP and TCP on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")
