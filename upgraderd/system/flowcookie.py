"""Flow-sticky UDP (`flows: cookie`): a classic BPF program that routes by a cookie in the datagram.

A `flows: cookie` listener's sockets are a pool (cookiepool.py), not the held
slot sockets of plain UDP: worker (generation g, slot s) gets a free socket of
the pool when it is first started (or one bound then, at the end of the
group), and the socket goes back to the pool once no worker of g holds it.
Every worker writes its cookie, the 4 bytes `g` (u16, big-endian) and `s` (u16),
at the start of each reply; the client puts it back at the start of each
datagram of the flow (as QUIC's connection ID, or udpgrm's dissectors).

The program attached to the port's SO_REUSEPORT group sees the UDP payload
at offset 0 (the kernel pulls the UDP header before it runs the program for a
UDP socket). It:

1. loads the payload length; shorter than 4 bytes: step 3;
2. loads the first word and compares it with the cookie of every owned socket
   of the pool, draining generations included: on a match it returns that
   socket's index in the group (a free socket has no cookie);
3. otherwise (a new flow, or a cookie of a generation that is gone) runs the
   usual steering program (steering.py): a hash over the ACTIVE generation's
   READY slots.

So a flow stays with the generation that answered its first datagram for as
long as that generation holds its socket, and moves to the ACTIVE one after
(the program maps a cookie to its socket's pool index, rebuilt whenever a
socket changes owner).

What classic BPF cannot do without maps (eBPF's SOCKMAP/REUSEPORT_SOCKARRAY),
and what that costs here:
- No state: the program cannot remember a flow. The client must carry the
  cookie, and a flow whose client drops it starts over on the ACTIVE one.
- Fixed offsets: the cookie must be at a fixed place in the payload (here the
  first 4 bytes). Formats with variable-length headers before the ID need a
  parser cBPF cannot express in general (no loops, jumps forward only).
- An index, not a socket: the program returns a position in the group's
  array, which moves when a socket leaves (the last one takes its place).
  Between that close and the next program, a datagram for the socket that
  moved is steered by an index past the end, and the kernel picks any socket
  of the group, another generation's too (it happened, a few milliseconds
  per close on a loaded machine). Hence the pool: a socket whose generation
  is gone is kept, free, for the next generation, and only free sockets at
  the end of the group close, so no index ever moves. What that costs: the
  group can stay as large as the most sockets ever owned at once (a reload's
  new generation next to the draining one, or more generations lingering),
  since a free socket before an owned one cannot close; and datagrams still queued on a socket when it went back to the pool (sent
  after its worker was killed at drain.timeout, say) are read, late, by its
  next owner, a newer generation, instead of being dropped.
- A process outside upgraderd that holds a copy of a pool socket keeps it
  in the group after the master closes it, and the order is then wrong.
- A table, not a lookup: each open socket costs two instructions and every
  datagram walks the table (4096 instructions at most: about 2,000 sockets).
- No authentication: anyone may send any cookie. A forged one only picks a
  live worker of this master to answer; it cannot reach anything else.
"""

from __future__ import annotations

import struct
from typing import Mapping, Sequence

from upgraderd.system import steering

BPF_LD_W_LEN = 0x00 | 0x00 | 0x80     # BPF_LD | BPF_W | BPF_LEN
BPF_JGE_K = 0x05 | 0x30 | 0x00        # BPF_JMP | BPF_JGE | BPF_K
BPF_JA = 0x05 | 0x00                  # BPF_JMP | BPF_JA
COOKIE = struct.Struct(">HH")         # generation, slot
PREFIX = "udp/cookie@"                # the mode part of such a socket's key: udp/cookie@GEN


def cookie(generation: int, slot: int) -> bytes:
    """Return the cookie of worker `slot` of `generation` (both taken modulo 65536)."""
    return COOKIE.pack(generation & 0xFFFF, slot & 0xFFFF)


def cookie_value(generation: int, slot: int) -> int:
    """Return the cookie as the program compares it (the first payload word, big-endian)."""
    return int.from_bytes(cookie(generation, slot), "big")


def key_cookie(key: tuple[str, int, str, int]) -> int | None:
    """Return the cookie value of a `flows: cookie` socket key, None for any other key."""
    if not key[2].startswith(PREFIX):
        return None
    return cookie_value(int(key[2][len(PREFIX):]), key[3])


def program(table: Mapping[int, int], positions: Sequence[int]) -> steering.Program:
    """Return cookie -> group position for `table`, else the steering program over `positions`.

    With no `positions` (nothing ready), an unknown cookie gets an index past
    any group, and the kernel then hashes over every socket.
    """
    default = steering.program(positions) if positions else (steering._ins(steering.BPF_RET_K, 0xFFFFFFFF),)
    entries = sorted(table.items())
    body: list[steering.Insn] = []
    for value, pos in entries:
        body += [steering._ins(steering.BPF_JEQ_K, value, jt=0, jf=1), steering._ins(steering.BPF_RET_K, pos)]
    head = [
        steering._ins(BPF_LD_W_LEN),
        steering._ins(BPF_JGE_K, COOKIE.size, jt=1, jf=0),
        steering._ins(BPF_JA, 1 + len(body)),       # too short for a cookie: the default
        steering._ins(steering.BPF_LD_W_ABS, 0),
    ]
    return (*head, *body, *default)
