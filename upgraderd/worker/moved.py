"""What moves in a hand-off, and who this worker is (shared by the taker and the giver)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from upgraderd.contract import env


def enabled() -> bool:
    """Return True if the master asked for hand-off (UPGRADERD_HANDOFF=auto)."""
    return os.environ.get(env.HANDOFF, "off") == env.HANDOFF_AUTO


def identity() -> tuple[int, int]:
    """Return this worker's generation and slot from the environment (0 when unset)."""
    def num(var: str) -> int:
        return env.small_number(os.environ.get(var, "0")) or 0
    return num(env.GENERATION), num(env.SLOT)


@dataclass
class Handed:
    """One connection as it moves between workers."""

    sock: socket.socket
    listener: str
    state: bytes = b""
    unhandled: bytes = b""
    unsent: bytes = b""

    @property
    def size(self) -> int:
        """Return the payload bytes that move with the connection (state, unhandled, unsent)."""
        return len(self.state) + len(self.unhandled) + len(self.unsent)
