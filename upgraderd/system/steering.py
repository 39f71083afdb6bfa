"""Steer a SO_REUSEPORT group's new connections to chosen sockets with classic BPF.

The kernel hashes each new connection over every socket of a SO_REUSEPORT
group, ready or not. A classic BPF program attached to the group with
SO_ATTACH_REUSEPORT_CBPF replaces that choice: run once per incoming SYN, it
returns an index into the group's socket array. The program built here loads
the packet's flow hash (ancillary `rxhash`; `random` where the hash is 0, so a
NIC that sets no hash still spreads), reduces it modulo the number of allowed
sockets, and maps the result to an allowed position. Connections then queue
only where a worker accepts, so a socket that is closed later (a failed grow,
a retired slot) holds nothing to reset, whatever net.ipv4.tcp_migrate_req says.

What the kernel does, as checked on Linux 6.x (tests/os/test_steering.py):
- The array is in the order the sockets started listening. When a socket
  leaves the group (its last fd closes, or a shutdown() of the listener), the
  last socket of the array moves into the freed index. `Group` tracks this.
- An index at or past the group's size is not an error: the kernel falls back
  to its own hash over every socket. The builder never returns such an index,
  and `Group.leave_plan()` keeps the program valid on both sides of a close.
- Loading packet data does not work: for TCP the headers have been pulled,
  so a load at offset 0 fails and the program returns 0. Ancillary loads do.
- The program belongs to the group, not to the socket it was attached
  through: it stays when that socket closes, and goes with the last socket.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass, field
from typing import Generic, Hashable, Iterable, Sequence, TypeVar

SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68

# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20     # BPF_LD | BPF_W | BPF_ABS
BPF_ALU_MOD_K = 0x04 | 0x90 | 0x00    # BPF_ALU | BPF_MOD | BPF_K
BPF_ALU_ADD_K = 0x04 | 0x00 | 0x00    # BPF_ALU | BPF_ADD | BPF_K
BPF_JEQ_K = 0x05 | 0x10 | 0x00        # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06 | 0x00               # BPF_RET | BPF_K
BPF_RET_A = 0x06 | 0x10               # BPF_RET | BPF_A
SKF_AD_OFF = -0x1000
SKF_AD_RXHASH = 32
SKF_AD_RANDOM = 56

# A jump table costs two instructions per allowed socket; the kernel takes
# at most 4096 (BPF_MAXINSNS). workers.count stops at 1024, but TTIN does not.
MAX_ALLOWED = 1024

Insn = tuple[int, int, int, int]
Program = tuple[Insn, ...]
K = TypeVar("K", bound=Hashable)


def _ins(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> Insn:
    return (code, jt, jf, k & 0xFFFFFFFF)


def program(positions: Iterable[int]) -> Program:
    """Return a program that sends each new connection to one of `positions` (group indices)."""
    allowed = sorted(set(positions))
    if not allowed or allowed[0] < 0:
        raise ValueError(f"a steering program needs allowed group positions >= 0, not {allowed}")
    if allowed != list(range(allowed[0], allowed[0] + len(allowed))):
        # Only a table costs instructions: past its limit, use some of the
        # allowed sockets rather than none (each one is still an allowed one).
        allowed = allowed[:MAX_ALLOWED]
    n = len(allowed)
    head = [
        _ins(BPF_LD_W_ABS, SKF_AD_OFF + SKF_AD_RXHASH),
        _ins(BPF_JEQ_K, 0, jt=0, jf=1),              # no flow hash: draw a random number
        _ins(BPF_LD_W_ABS, SKF_AD_OFF + SKF_AD_RANDOM),
        _ins(BPF_ALU_MOD_K, n),
    ]
    if allowed == list(range(allowed[0], allowed[0] + n)):
        # A contiguous run (the usual case: slots 0..n-1) needs no table.
        add = [_ins(BPF_ALU_ADD_K, allowed[0])] if allowed[0] else []
        return (*head, *add, _ins(BPF_RET_A))
    table: list[Insn] = []
    for i, pos in enumerate(allowed[:-1]):
        table += [_ins(BPF_JEQ_K, i, jt=0, jf=1), _ins(BPF_RET_K, pos)]
    return (*head, *table, _ins(BPF_RET_K, allowed[-1]))


def encode(prog: Program) -> bytes:
    """Return `prog` as an array of struct sock_filter."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach(sock: socket.socket, prog: Program) -> None:
    """Attach `prog` to the SO_REUSEPORT group of listening `sock`; raise OSError if refused."""
    code = encode(prog)
    # setsockopt copies the filter before it returns; `buf` is alive until then.
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def detach(sock: socket.socket) -> None:
    """Remove the group's program (the kernel hashes over every socket again); raise OSError."""
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)


@dataclass
class Group(Generic[K]):
    """One SO_REUSEPORT group as the kernel sees it: members by index, and what steers it.

    `allowed` is the set of members new connections may go to (None: not
    steered); `attached` the program now in the kernel (None: none).
    `known` is False when the order is not certain (sockets adopted from a
    master that did not record it, or a socket closed unsteered while a
    worker still held it, so that it left later): such a group is not steered.
    """

    members: list[K] = field(default_factory=list)
    allowed: frozenset[K] | None = None
    attached: Program | None = None
    known: bool = True
    refused: bool = False
    # The last warning given about this group, so that it is given once.
    note: str | None = None
    # `members` as of the last steer, to skip building an unchanged program.
    order: list[K] = field(default_factory=list)

    def join(self, key: K) -> None:
        """Record that `key` started listening: the kernel appends it."""
        self.members.append(key)

    def leave(self, key: K) -> None:
        """Record that `key` left: the last member moves into its index."""
        i = self.members.index(key)
        last = self.members.pop()
        if i < len(self.members):
            self.members[i] = last
        if self.allowed is not None:
            self.allowed = self.allowed - {key}

    def want(self, keys: Iterable[K] | None = None) -> Program | None:
        """Return the program for `keys` (default: `allowed`) at today's indices; None if none is left."""
        chosen = self.allowed if keys is None else frozenset(keys)
        if not chosen:
            return None
        # One pass over the members, not an index() per key: retiring N slots
        # calls this N times, and a quadratic step here made that cubic.
        positions = [i for i, k in enumerate(self.members) if k in chosen]
        return program(positions) if positions else None

    def leave_plan(self, key: K) -> Program | None:
        """Return the program to hold while `key` leaves; None if nothing else is allowed.

        It excludes `key` and, where another choice exists, the last member
        (which moves into `key`'s index), so each index it returns names the
        same socket before and after the close. If the last member is the only
        one left, its old index is out of range after the close, and the kernel
        hashes over the group until the caller attaches the next program.
        """
        rest = (self.allowed or frozenset()) - {key}
        stable = rest - {self.members[-1]}
        return self.want(stable or rest)

    def order_of(self, keys: Sequence[K]) -> list[K]:
        """Return `keys` sorted by index, last first: closing in that order moves nobody."""
        index = {k: i for i, k in enumerate(self.members)}
        return sorted(keys, key=index.__getitem__, reverse=True)
