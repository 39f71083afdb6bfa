"""Where a WebSocket's incoming byte stream stands: inside a frame, or at the end of a whole message.

A WebSocket moves to the next generation only at a message boundary
(wsmove.py): every byte read so far belongs to frames that are complete, and
the last data frame had FIN set (no fragmented message is pending). wsproto
has no public accessor for that, so the server watches the bytes it feeds
wsproto itself, reading only frame headers (RFC 6455 §5.2): FIN, the opcode,
the 7, 16 or 64-bit payload length and the mask bit. Payloads are skipped by
count, never copied or unmasked.

Invariants:
- The scanner sees exactly the bytes given to `wsproto`'s `receive_data`,
  in order; then "at a boundary" here means wsproto holds no partial frame.
- Bounded: at most one partial header (<= 14 bytes) is kept between calls.
- Control frames (opcode >= 8, always FIN) may come between the fragments of
  a data message; they do not end the pending message.

Hazards: the scanner does not validate (reserved bits, opcodes, control
frame length): wsproto does, and a connection it rejects is closed, never
moved. A 64-bit length is taken as given; the message size limit is wsproto's
and the server's business.
"""

from __future__ import annotations

MAX_HEADER = 14   # 2 + 8 (64-bit length) + 4 (mask key)


def header_size(first2: bytes) -> int:
    """Return the size of a frame header from its first two bytes."""
    n = first2[1] & 0x7F
    return 2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if first2[1] & 0x80 else 0)


class FrameScanner:
    """Tracks frame and message boundaries in the bytes a WebSocket server reads."""

    __slots__ = ("_head", "_left", "_fragmented")

    def __init__(self) -> None:
        self._head = b""          # the start of a frame header not complete yet
        self._left = 0            # payload bytes of the current frame still to come
        self._fragmented = False  # a data frame without FIN came, and no final continuation yet

    def at_boundary(self) -> bool:
        """Return True if the bytes so far end exactly at the end of a whole message (or are none)."""
        return not self._head and not self._left and not self._fragmented

    def feed(self, data: bytes) -> None:
        """Account for `data`, the next bytes read from the client."""
        pos, end = 0, len(data)
        while pos < end:
            if self._left:
                step = min(self._left, end - pos)
                self._left -= step
                pos += step
                continue
            head = self._head + data[pos:pos + MAX_HEADER - len(self._head)]
            if len(head) < 2 or len(head) < header_size(head):
                self._head = head     # wait for the rest of the header
                return
            size = header_size(head)
            pos += size - len(self._head)
            self._head = b""
            self._frame(head[:size])

    def _frame(self, head: bytes) -> None:
        fin, opcode, n = head[0] & 0x80, head[0] & 0x0F, head[1] & 0x7F
        if n == 126:
            n = int.from_bytes(head[2:4], "big")
        elif n == 127:
            n = int.from_bytes(head[2:10], "big")
        if opcode < 8:    # continuation, text or binary: the data message's progress
            self._fragmented = not fin
        self._left = n
