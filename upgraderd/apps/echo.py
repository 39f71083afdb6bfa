"""The built-in echo worker: every byte received is sent back, in order.

A UDP datagram is answered with itself, to the address it came from.

A connection stays open until the client closes it, also while the worker
drains: an echo stream has no request boundary at which closing would be
safe. With `drain.handoff: auto` (the default) a draining echo worker hands
every connection to the new generation and exits at once; otherwise (or if
no worker takes them) it exits when its last client leaves, or when the
master's drain timeout SIGKILLs it.
"""

from __future__ import annotations

from upgraderd.apps import run


class Echo:
    """Echo protocol: reply with exactly what was received."""

    mirror = True  # the loop sends back what it reads without calling received() (conn.py)

    def received(self, data: bytes) -> bytes:
        """Return `data` unchanged."""
        return data

    def datagram(self, data: bytes) -> bytes:
        """Answer a UDP datagram with itself."""
        return data

    def closing(self) -> bool:
        """Never close on our own."""
        return False

    def idle(self) -> bool:
        """An echo connection is never safe to close from our side."""
        return False

    def drain(self) -> None:
        """Nothing to do: the client decides when the stream ends."""

    def handoff_state(self) -> tuple[bytes, bytes] | None:
        """An echo connection can move at any time, and carries no state."""
        return b"", b""

    def restore(self, state: bytes) -> None:
        """Nothing to restore."""


def main() -> int:
    """Serve echo on every inherited listener."""
    return run.main(lambda name: Echo())


if __name__ == "__main__":
    raise SystemExit(main())
