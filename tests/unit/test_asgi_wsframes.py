"""The WebSocket frame-boundary scanner (apps/asgi/wsframes.py) on split, fragmented and interleaved input."""

from __future__ import annotations

import os
import random

from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import Message

from upgraderd.apps.asgi.wsframes import FrameScanner

TEXT, BINARY, CONT, CLOSE, PING, PONG = 1, 2, 0, 8, 9, 10


def frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True) -> bytes:
    """Return one frame as a client sends it (masked), with the shortest length encoding."""
    n = len(payload)
    first = bytes([(0x80 if fin else 0) | opcode])
    m = 0x80 if mask else 0
    if n < 126:
        length = bytes([m | n])
    elif n < 1 << 16:
        length = bytes([m | 126]) + n.to_bytes(2, "big")
    else:
        length = bytes([m | 127]) + n.to_bytes(8, "big")
    if not mask:
        return first + length + payload
    key = os.urandom(4)
    return first + length + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def stream(frames: list[tuple[int, bytes, bool]]) -> tuple[bytes, set[int]]:
    """Return the bytes of `frames` and the offsets at which a whole message (and nothing more) has come."""
    data, ends, fragmented = b"", {0}, False
    for opcode, payload, fin in frames:
        data += frame(opcode, payload, fin)
        if opcode < 8:
            fragmented = not fin
        if not fragmented:
            ends.add(len(data))
    return data, ends


def check_every_split(data: bytes, ends: set[int], seed: int) -> None:
    rng = random.Random(seed)
    for k in range(len(data) + 1):
        scanner, pos = FrameScanner(), 0
        while pos < k:   # the first k bytes in random small pieces, as recv() may give them
            step = rng.randint(1, 5)
            scanner.feed(data[pos:min(k, pos + step)])
            pos = min(k, pos + step)
        assert scanner.at_boundary() is (k in ends), f"after {k} of {len(data)} bytes"


def test_one_message_is_a_boundary_only_when_whole() -> None:
    data, ends = stream([(TEXT, b"hello", True)])
    assert ends == {0, len(data)}
    check_every_split(data, ends, 1)


def test_fragmented_message_with_control_frames_between_its_fragments() -> None:
    data, ends = stream([(TEXT, b"he", False), (PING, b"p1", True), (CONT, b"ll", False),
                         (PONG, b"", True), (CONT, b"o", True), (PING, b"", True), (BINARY, b"\x00\x01", True)])
    # Inside the fragmented message, a complete ping is not a boundary; after it, every frame end is.
    assert len(ends) == 4
    check_every_split(data, ends, 2)


def test_16_and_64_bit_lengths_and_empty_frames() -> None:
    data, ends = stream([(BINARY, b"x" * 300, True), (TEXT, b"", False), (CONT, b"y" * 70000, False),
                         (CONT, b"", True), (TEXT, b"", True)])
    scanner = FrameScanner()
    for i in range(0, len(data), 4093):
        scanner.feed(data[i:i + 4093])
    assert scanner.at_boundary()
    check_header_splits = [e + d for e in sorted(ends) for d in range(1, 11)]
    for k in check_header_splits:
        if k <= len(data):
            s = FrameScanner()
            s.feed(data[:k])
            assert s.at_boundary() is (k in ends)


def test_the_scanner_agrees_with_wsproto_on_random_streams() -> None:
    """At every end of a chunk, a boundary here is exactly where wsproto has finished a message and holds nothing."""
    rng = random.Random(7)
    for _ in range(30):
        frames: list[tuple[int, bytes, bool]] = []
        for _ in range(rng.randint(1, 6)):
            parts = rng.randint(1, 3)
            for i in range(parts):
                frames.append((BINARY if i == 0 else CONT, os.urandom(rng.choice([0, 1, 125, 126, 200, 65536])),
                               i == parts - 1))
                if rng.random() < 0.3:
                    frames.append((PING, os.urandom(rng.randint(0, 125)), True))
        data, ends = stream(frames)
        server, scanner = Connection(ConnectionType.SERVER), FrameScanner()
        pos, finished = 0, 0
        while pos < len(data):
            step = rng.randint(1, 3000)
            chunk = data[pos:pos + step]
            pos += len(chunk)
            scanner.feed(chunk)
            server.receive_data(chunk)
            finished += sum(1 for e in server.events() if isinstance(e, Message) and e.message_finished)
            assert scanner.at_boundary() is (pos in ends)
        assert finished == sum(1 for _, _, fin in frames if fin) - sum(1 for o, _, _ in frames if o == PING)
