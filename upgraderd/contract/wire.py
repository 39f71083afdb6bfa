"""The hand-off channel: its address, and the frames that move one connection over it.

A worker that takes connections listens on a SOCK_SEQPACKET Unix socket at
`DIR/handoff-<generation>-<slot>` (`channel_name`), where DIR is the master's
channel directory (UPGRADERD_HANDOFF_DIR, made by system/channeldir.py: a
fresh random name `upgraderd-<master pid>-handoff-XXXXXXXX`, mode 0700, owned
by the workers' user), so no other user can bind or connect there. The old
abstract names, `@upgraderd-<master pid>-handoff-<generation>-<slot>`, open
to every local user, are still understood where no directory is known (a
worker of an older master across a USR2 re-exec, the library on its own).
Givers find the channels in /proc/net/unix and check who owns them
(worker/peers.py), since a name proves nothing.

One connection moves in one exchange:

    giver                                    taker
    OFFER  (the fd in SCM_RIGHTS, header,
            first part of the payload)  ->
    DATA   (rest of the payload, if any) ->
                                         <-  ACK, or REFUSE <reason>
    COMMIT                               ->
    ...                                      (more exchanges)
    END    (after the last COMMIT of a give) ->

Batches. A taker of this release answers every offer with ACK followed by
the word TAKES_BATCHES (a later release may add more words after it), which an older giver ignores (it reads the kind
only). A giver that has seen it may then send a BATCH instead of single
OFFERs: up to MAX_BATCH connections in one message, their fds in one
SCM_RIGHTS in the same order, each with its OFFER header and its whole
payload inline (the message fits in CHUNK; a connection whose payload does
not goes as an OFFER). One ACK or one REFUSE answers the whole batch, and one
COMMIT commits it. Three messages then move up to 64 connections where single
offers take three per connection: at 50,000 connections the per-message cost
(a system call on each side and a wake-up) was the bulk of a hand-off's time.
A giver never sends a BATCH to a taker that has not said it takes them, so an
older taker (which would read it as malformed) is never sent one.

A giver sends END to each taker it offered to once a give (one
`give_many` call, one or more pipelined rounds) is over: a taker then knows
that every connection this giver meant for it has arrived, so a broadcast
server can hold delivery while connections are still on their way
(worker/taker.py `Taker.arriving`). END is optional: a giver of an older
release never sends it, and its hand-off ends when it closes the channel.
A taker of an older release reads END as malformed and closes the channel
after every COMMIT, so nothing is lost either way.

The master marks a stop (not a reload) by creating STOP_MARKER in the
channel directory before it sends the drain signal (system/channeldir.py
`mark_stopping`): a draining worker that finds it knows that no successor
will take its connections (worker/__init__.py `stopping`).

Every message starts with MAGIC and a one-byte kind. SEQPACKET keeps message
boundaries, so a message is never split or merged; a long payload (the state
blob, the bytes read but not handled, the output not sent) is cut into DATA
messages of at most CHUNK bytes, which always fit in a socket buffer.

The taker starts serving only on COMMIT, and the giver closes its copy of
the connection only after sending it. If ACK comes late, or the taker
vanishes, the giver closes the channel without COMMIT and serves on; the
taker, on seeing the channel end without COMMIT, closes its copy. Closing a
copy of a TCP socket's fd never affects the connection while another copy
is open, so no path loses the connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"UPH1"
OFFER, DATA, ACK, REFUSE, COMMIT, END, BATCH = b"O", b"D", b"A", b"R", b"C", b"E", b"B"
TAKES_BATCHES = "batches"  # what follows ACK from a taker that takes BATCH messages
MAX_BATCH = 64  # connections in one BATCH (SCM_RIGHTS carries up to 253 fds)
CHUNK = 32 * 1024
MAX_LISTENER = 255
MAX_STATE = 1 << 20
MAX_PAYLOAD = 8 << 20
# Payload bytes (state, unhandled, unsent) one giver may have offered and not yet
# committed on one channel connection: a giver plans its rounds by it and a taker
# drops a giver that sends more. Two of the largest offers fit.
MAX_PENDING_BYTES = 2 * MAX_PAYLOAD
MAX_REASON = 32
RECV_SIZE = CHUNK + 1024
_OFFER_HEAD = struct.Struct("!HIII")
_BATCH_COUNT = struct.Struct("!H")
PREFIX = "upgraderd-"


DIR_PREFIX = "upgraderd-{master}-handoff-"  # the channel directory's name, before its random part
STOP_MARKER = "stopping"  # made in the channel directory when the master stops (never a channel name)


def channel_name(master: int, generation: int, slot: int, directory: str | None = None) -> str:
    """Return the channel name of one worker slot: a path in `directory`, else an abstract name
    (without the leading NUL)."""
    if directory is not None:
        return f"{directory.rstrip('/')}/handoff-{generation}-{slot}"
    return f"{PREFIX}{master}-handoff-{generation}-{slot}"


def address(name: str) -> bytes:
    """Return the socket address for `name`: the path itself, or the abstract name."""
    return name.encode() if name.startswith("/") else b"\0" + name.encode()


@dataclass(frozen=True)
class Channel:
    """A taker's channel, as its name says: whose master, generation and slot."""

    generation: int
    slot: int
    name: str


def parse_name(name: str, master: int, directory: str | None = None) -> Channel | None:
    """Return the channel `name` stands for if it belongs to `master`, else None.

    With `directory` (a worker: its master told it), only a path in that
    directory is a channel. Without (a process outside the master, such as an
    operator's tool), a path in any directory named for `master`, or an old
    abstract name, is listed; the peer check still decides whom to trust.
    """
    if name.startswith("/"):
        parent, _, base = name.rpartition("/")
        ours = (parent == (directory or "").rstrip("/") if directory is not None
                else parent.rpartition("/")[2].startswith(DIR_PREFIX.format(master=master)))
        if not ours or not base.startswith("handoff-"):
            return None
        rest = base[len("handoff-"):]
    elif directory is None and name.startswith(f"{PREFIX}{master}-handoff-"):
        rest = name[len(f"{PREFIX}{master}-handoff-"):]
    else:
        return None
    gen, sep, slot = rest.partition("-")
    # isascii: str.isdigit() also takes digits int() refuses ('²'), and any local user may bind a name.
    if not sep or not (gen + slot).isascii() or not gen.isdigit() or not slot.isdigit() or len(gen) > 9 \
            or len(slot) > 9:
        return None
    return Channel(int(gen), int(slot), name)


def stop_marker(directory: str) -> str:
    """Return the path whose existence says the master of `directory` is stopping."""
    return f"{directory.rstrip('/')}/{STOP_MARKER}"


class Malformed(ValueError):
    """A message that does not follow this protocol."""


@dataclass
class OfferHead:
    """The fixed part of an OFFER: sizes of what follows."""

    listener: str
    state_len: int
    unhandled_len: int
    unsent_len: int

    @property
    def total(self) -> int:
        return self.state_len + self.unhandled_len + self.unsent_len

    def split(self, payload: bytes) -> tuple[bytes, bytes, bytes]:
        """Return the state blob, the unhandled bytes and the unsent output of a whole payload."""
        u = self.state_len + self.unhandled_len
        return payload[:self.state_len], payload[self.state_len:u], payload[u:]


def _head(listener: str, state: bytes, unhandled: bytes, unsent: bytes) -> bytes:
    """Return one connection's OFFER header and listener name; raise ValueError past the limits."""
    name = listener.encode()
    if len(name) > MAX_LISTENER or len(state) > MAX_STATE:
        raise ValueError("listener name or state blob too long to hand off")
    if len(state) + len(unhandled) + len(unsent) > MAX_PAYLOAD:
        raise ValueError("connection carries too many bytes to hand off")
    return _OFFER_HEAD.pack(len(name), len(state), len(unhandled), len(unsent)) + name


def _read_head(msg: bytes, at: int) -> tuple[OfferHead, int]:
    """Return the OFFER header and listener name at `at` in `msg`, and where its payload starts;
    raise Malformed."""
    if len(msg) < at + _OFFER_HEAD.size:
        raise Malformed("truncated offer")
    name_len, state_len, unhandled_len, unsent_len = _OFFER_HEAD.unpack_from(msg, at)
    body = at + _OFFER_HEAD.size
    if name_len > MAX_LISTENER or len(msg) < body + name_len:
        raise Malformed("bad listener name length")
    try:
        name = msg[body:body + name_len].decode()
    except UnicodeDecodeError:
        raise Malformed("listener name is not UTF-8") from None
    head = OfferHead(name, state_len, unhandled_len, unsent_len)
    if state_len > MAX_STATE or head.total > MAX_PAYLOAD:
        raise Malformed("payload too large")
    return head, body + name_len


def encode_offer(listener: str, state: bytes, unhandled: bytes, unsent: bytes) -> list[bytes]:
    """Return the OFFER message and its DATA messages for one connection."""
    head = MAGIC + OFFER + _head(listener, state, unhandled, unsent)
    payload = state + unhandled + unsent
    first = max(0, CHUNK - len(head))
    msgs = [head + payload[:first]]
    step = CHUNK - len(MAGIC) - 1
    for i in range(first, len(payload), step):
        msgs.append(MAGIC + DATA + payload[i:i + step])
    return msgs


def encode(kind: bytes, reason: str = "") -> bytes:
    """Return an ACK, REFUSE, COMMIT or END message."""
    return MAGIC + kind + reason.encode("ascii", "replace")[:MAX_REASON]


def kind_of(msg: bytes) -> bytes:
    """Return the kind of `msg`; raise Malformed if it is not one of ours."""
    if len(msg) < len(MAGIC) + 1 or not msg.startswith(MAGIC):
        raise Malformed("not a hand-off message")
    kind = msg[len(MAGIC):len(MAGIC) + 1]
    if kind not in (OFFER, DATA, ACK, REFUSE, COMMIT, END, BATCH):
        raise Malformed(f"unknown message kind {kind!r}")
    return kind


def decode_offer(msg: bytes) -> tuple[OfferHead, bytes]:
    """Return the header and the first payload bytes of an OFFER; raise Malformed."""
    head, body = _read_head(msg, len(MAGIC) + 1)
    first = msg[body:]
    if len(first) > head.total:
        raise Malformed("more payload than announced")
    return head, first


def batch_entry(listener: str, state: bytes, unhandled: bytes, unsent: bytes) -> bytes | None:
    """Return one connection's part of a BATCH (its OFFER header and whole payload), or None if it
    cannot go in one (too large: it goes as an OFFER, or not at all)."""
    try:
        entry = _head(listener, state, unhandled, unsent) + state + unhandled + unsent
    except ValueError:
        return None
    return entry if len(entry) <= CHUNK - len(MAGIC) - 1 - _BATCH_COUNT.size else None


def batch_fits(entries_size: int, count: int, entry: bytes) -> bool:
    """Return True if a BATCH of `count` entries (`entries_size` bytes) has room for `entry`."""
    return count < MAX_BATCH and len(MAGIC) + 1 + _BATCH_COUNT.size + entries_size + len(entry) <= CHUNK


def encode_batch(entries: list[bytes]) -> bytes:
    """Return the BATCH message of `entries` (from `batch_entry`, checked with `batch_fits`)."""
    return MAGIC + BATCH + _BATCH_COUNT.pack(len(entries)) + b"".join(entries)


def decode_batch(msg: bytes) -> list[tuple[OfferHead, bytes]]:
    """Return each connection's header and payload in a BATCH; raise Malformed."""
    start = len(MAGIC) + 1
    if len(msg) < start + _BATCH_COUNT.size:
        raise Malformed("truncated batch")
    (count,) = _BATCH_COUNT.unpack_from(msg, start)
    if not 1 <= count <= MAX_BATCH:
        raise Malformed(f"a batch of {count} connections")
    at = start + _BATCH_COUNT.size
    out: list[tuple[OfferHead, bytes]] = []
    for _ in range(count):
        head, body = _read_head(msg, at)
        at = body + head.total
        if at > len(msg):
            raise Malformed("truncated batch")
        out.append((head, msg[body:at]))
    if at != len(msg):
        raise Malformed("bytes after the last connection of a batch")
    return out


def takes_batches(reply: bytes) -> bool:
    """Return True if `reply` is an ACK from a taker that takes BATCH messages."""
    return reply.startswith(MAGIC + ACK) and reply[len(MAGIC) + 1:].split()[:1] == [TAKES_BATCHES.encode()]


def data_of(msg: bytes) -> bytes:
    """Return the payload bytes of a DATA message."""
    return msg[len(MAGIC) + 1:]


def reason_of(msg: bytes) -> str:
    """Return the reason of a REFUSE message, made printable."""
    text = msg[len(MAGIC) + 1:len(MAGIC) + 1 + MAX_REASON].decode("ascii", "replace")
    return "".join(c if c.isalnum() or c == "_" else "?" for c in text) or "unspecified"
